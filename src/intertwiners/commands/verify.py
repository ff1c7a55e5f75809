"""intertwiners verify: trace a model's weight-space symmetries and check them on its outputs."""

from __future__ import annotations

import json
import math

NAME = "verify"
HELP = ("Find a model's weight-space symmetries by tracing (spaces, groups, pinned spaces) and print the "
        "per-space max abs/relative output error of randomly transformed copies, in eval and train mode; the spec "
        "is checked as derived (no safety net), so a derived space that changes the output exits 1. "
        "MODEL: an architecture name, a saved model folder (this package's or a local Hugging Face one), "
        "timm:NAME, hf:gpt2|bert|bert-mlm|llama (tiny random configs) or package.module:factory.")

ARCHS = ("myrtle_cnn", "resnet20", "mlp")


def add_arguments(p):
    p.add_argument("model", help="an architecture name (" + ", ".join(ARCHS) + "), a saved model folder (or its "
                                 "model.safetensors), a local Hugging Face model folder (safetensors; token ids or "
                                 "images of the config's size), timm:NAME (random weights; needs timm), hf:gpt2, "
                                 "hf:bert or hf:llama (2 layers, width 64, random weights; needs transformers), or "
                                 "package.module:factory (called with no arguments; returns a model or "
                                 "(model, example_input))")
    p.add_argument("--activation", default=None, help="for an architecture name, e.g. relu, tanh, leaky_relu:0.2")
    p.add_argument("--shortcut", default=None, choices=["A", "B"], help="resnet20 shortcut option")
    p.add_argument("--width", type=int, default=None, help="myrtle_cnn width (default 16)")
    p.add_argument("--no-batch-norm", action="store_true", help="myrtle_cnn without batch norm")
    p.add_argument("--in-features", type=int, default=64, help="mlp input size")
    p.add_argument("--input-size", type=int, default=None,
                   help="image side (default: the model's; 32 for resnet20; timm: its configured size)")
    p.add_argument("--input-shape", default=None,
                   help="input shape without the batch axis, e.g. 3,32,32 or 64 (factories and folders)")
    p.add_argument("--tokens", type=int, default=16, help="sequence length of the token ids for hf: models")
    p.add_argument("--batch", type=int, default=8, help="size of the random input batch")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--trials", type=int, default=2, help="random elements per space")
    p.add_argument("--warmup", type=int, default=3,
                   help="train-mode forwards on random batches first, so batch norm has non-trivial running "
                        "statistics (on a copy; a loaded model is never changed on disk)")
    p.add_argument("--rtol", type=float, default=None,
                   help="max relative error to pass (default 1e-9 for float64, 1e-6 when the graph casts to "
                        "float32 inside, 1e-4 for float32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"--input-shape must be positive integers separated by commas, got {text!r}") from None
    if not shape or min(shape) < 1:
        raise ValueError(f"--input-shape must be positive integers separated by commas, got {text!r}")
    return shape


def validate(args) -> None:
    """Every argument checked before any model is built or file opened (ValueError, one line)."""
    for name in ("batch", "trials", "in_features", "tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    for name in ("width", "input_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be 0 or more, got {args.warmup}")
    if args.batch < 2:
        raise ValueError("--batch must be at least 2 (train-mode batch norm needs more than one sample)")
    if args.rtol is not None and not (math.isfinite(args.rtol) and args.rtol >= 0):
        raise ValueError(f"--rtol must be a finite number >= 0, got {args.rtol}")
    _parse_shape(args.input_shape)


def build_builtin(args, spec: str):
    """A :class:`~intertwiners.model_specs.LoadedModel` for an architecture name or a saved folder."""
    from pathlib import Path

    from .. import models
    from ..model_specs import LoadedModel

    if spec in ARCHS:
        kwargs = {}
        if args.activation:
            kwargs["activation"] = args.activation
        if spec == "myrtle_cnn":
            kwargs.update(width=16 if args.width is None else args.width, batch_norm=not args.no_batch_norm)
            if args.input_size:
                kwargs["input_size"] = args.input_size
        elif spec == "resnet20":
            if args.shortcut:
                kwargs["shortcut"] = args.shortcut
        else:
            kwargs["in_features"] = args.in_features
        model = models.ARCHITECTURES[spec](**kwargs)
    elif Path(spec).is_dir() and _is_hugging_face(spec):
        return _hugging_face(args, spec)
    elif Path(spec).exists():
        model = models.load(spec)
    else:
        raise ValueError(f"{spec!r} is neither a saved model folder nor an architecture ({', '.join(ARCHS)}), "
                         "nor timm:NAME, hf:gpt2|bert|bert-mlm|llama or package.module:factory")
    cfg = getattr(model, "intertwiners_config", {"arch": "", "kwargs": {}})
    kw = cfg.get("kwargs", {})
    if cfg.get("arch") == "mlp":
        shape = (kw["in_features"],)
    elif cfg.get("arch") == "myrtle_cnn":
        side = kw.get("input_size", 32)
        shape = (kw.get("in_channels", 3), side, side)
    else:
        side = args.input_size or 32
        shape = (kw.get("in_channels", 3), side, side)
    return LoadedModel(model, shape=shape, description=spec)


def _is_hugging_face(folder: str) -> bool:
    from ..alignment.checkpoints import HUGGING_FACE, folder_kind

    return folder_kind(folder) == HUGGING_FACE


def _hugging_face(args, folder: str):
    """A local Hugging Face model folder (safetensors only): token ids for a model that reads ``input_ids``,
    images of the config's size for one that reads ``pixel_values``."""
    from ..alignment.checkpoints import load_hf
    from ..model_specs import LoadedModel

    model = load_hf(folder).model
    config, reads = model.config, getattr(model, "main_input_name", "input_ids")
    if reads == "input_ids" and getattr(config, "vocab_size", None):
        return LoadedModel(model, kind="tokens", shape=(args.tokens,), vocab=int(config.vocab_size),
                           description=f"{folder} ({type(model).__name__})")
    if reads == "pixel_values":
        side = args.input_size or int(getattr(config, "image_size", 0) or 32)
        return LoadedModel(model, shape=(int(getattr(config, "num_channels", 3) or 3), side, side),
                           description=f"{folder} ({type(model).__name__})")
    raise ValueError(f"{folder}: a {type(model).__name__} reads {reads!r}; verify makes token ids and images only "
                     "(use package.module:factory returning (model, example_input))")


def build_model(args):
    """The :class:`~intertwiners.model_specs.LoadedModel` that ``args.model`` names."""
    from ..model_specs import load_model_spec

    return load_model_spec(args.model, input_size=args.input_size, tokens=args.tokens,
                           input_shape=_parse_shape(args.input_shape),
                           builtin=lambda spec: build_builtin(args, spec))


def _tensors(y) -> list:
    """The tensors of a model output (a tensor, a tuple/list, a dict or a transformers ModelOutput)."""
    from ..symmetries.capture import tensors_of

    return tensors_of(y)


def nan_max(values) -> float:
    """max of ``values`` (0 for none), NaN as soon as one is NaN: a NaN error never passes."""
    from .._util import max_nan

    return max_nan(0.0, *values)


def _json_float(v: float):
    return v if math.isfinite(v) else str(v)


def run(args) -> int:
    validate(args)
    import torch

    from .._util import resolve_device
    from ..features import eval_mode
    from ..symmetries import symmetry_spec, tolerance, verify_symmetry

    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    device = resolve_device(args.device)
    loaded = build_model(args)
    model = loaded.model.to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(args.seed)
    x = loaded.batch(args.batch, g, dtype).to(device)
    what = loaded.description or args.model
    try:
        with torch.no_grad(), eval_mode(model, False):
            outputs = _tensors(model(x))
        with torch.no_grad(), eval_mode(model, True):
            for k in range(args.warmup):
                model(loaded.batch(args.batch, g, dtype, warmup=k + 1).to(device))
    except (RuntimeError, TypeError, IndexError) as err:  # e.g. an input shape the model does not take
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{what}: the model does not run on an input of shape {tuple(x.shape)} "
                         f"({type(err).__name__}: {first}); see --input-shape, --input-size, --tokens") from err
    if not outputs or not all(bool(torch.isfinite(t).all()) for t in outputs if t.is_floating_point()):
        raise ValueError(f"{what}: the model's output on the example input is "
                         + ("not a tensor" if not outputs else "not finite (NaN or inf weights or inputs?)")
                         + "; nothing to compare")
    spec = symmetry_spec(model, x, check=False)   # the spec as derived: a wrong rule must fail here, not be pinned
    rtol = args.rtol if args.rtol is not None else tolerance(spec, dtype)
    report = verify_symmetry(model, x, spec=spec, generator=g, trials=args.trials, rtol=rtol)
    worst = nan_max(r.max_rel for r in report.rows)
    failures = [r for r in report.rows if not r.max_rel <= rtol]  # NaN fails
    checked = bool(report.rows)
    if args.json:
        print(json.dumps({
            "model": loaded.description or args.model,
            "spaces": {n: {"size": s.size, "kind": s.kind, "sites": s.sites} for n, s in spec.spaces.items()},
            "pinned": spec.pinned,
            "errors": [{k: _json_float(v) if isinstance(v, float) else v for k, v in r.__dict__.items()}
                       for r in report.rows],
            "max_abs": _json_float(nan_max(r.max_abs for r in report.rows)), "max_rel": _json_float(worst),
            "rtol": rtol, "checked": checked, "ok": not failures}))
    else:
        print(spec.summary())
        print()
        print(report)
        if failures:
            print(f"FAILED: {len(failures)} row(s) above rtol {rtol:g}: "
                  + ", ".join(f"{r.space} ({r.mode})" for r in failures))
        elif not checked:
            print(f"NOTHING CHECKED: no symmetry space was found ({len(spec.pinned)} pinned), so there is no "
                  "transformed copy to compare")
        else:
            print(f"OK: every space within rtol {rtol:g}")
    return 1 if failures else 0
