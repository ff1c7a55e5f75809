"""Benchmark: how much of each model family a random weight-space symmetry moves, and whether it is exact.

For every replica of ``tests/replicas.py`` (torchvision/timm-style CNNs, ViTs, MLP-Mixer) and, when
transformers is installed, the tiny GPT-2, BERT, BertForMaskedLM, Llama and ten more transformers families
(``replicas.hf_family``), in float64:
``symmetry_spec`` -> ``random_symmetry`` -> ``apply_symmetry``, then

* **changed**: the share of parameter elements that the transformed copy changed. An element counts as
  changed when its new value differs from the old one at all (``new != old``); the share is over every
  parameter element of the model (tied parameters once). The figure the ``rebasin`` package reports
  (83.8% for its ViT-B/16); the replicas' normalisation parameters are random, so a permuted or scaled
  gamma/beta counts.
* **eval / train**: the max relative output error max|f'(x) - f(x)| / max|f(x)| over all output tensors,
  in eval mode and in train mode (batch statistics, then eval with the updated running statistics; dropout
  off). NaN propagates: a NaN error is printed as nan and counts as a failure.
* **spaces / pinned**: the number of free spaces and of pinned ones; **untouched**: the original model's
  parameters and buffers are bit-for-bit the same afterwards.

A model whose analysis raises is listed with the error and counts as 0% changed in the average.

    python benchmarks/bench_symmetry_coverage.py [--seeds 3] [--only NAME ...] [--no-hf] [--wide 256] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import replicas  # noqa: E402

from intertwiners._util import max_nan
from intertwiners.symmetries import apply_symmetry, random_symmetry, symmetry_spec  # noqa: E402
from intertwiners.symmetries.capture import tensors_of
from intertwiners.symmetries.compare import no_dropout

_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def tensors(y) -> list[torch.Tensor]:
    """Every floating-point tensor of a model output (tensor, tuple, dict, transformers ModelOutput)."""
    return [t for t in tensors_of(y) if t.is_floating_point()]


def nan_max(values) -> float:
    """max (0 for none), NaN as soon as one value is NaN."""
    return max_nan(0.0, *values)


def relative_error(a, b) -> float:
    ta, tb = tensors(a), tensors(b)
    if len(ta) != len(tb) or not ta:
        return math.nan
    err = nan_max(float((u - v).abs().max()) for u, v in zip(ta, tb))
    scale = nan_max(float(u.abs().max()) for u in ta)
    return err / scale if scale > 0 else (0.0 if err == 0 else math.inf)


@torch.no_grad()
def forward(model: nn.Module, x, train: bool):
    """Dropout off; a fixed random state, so that stochastic depth drops the same samples in both models."""
    model.train(train)
    if train:
        for m in model.modules():
            if isinstance(m, _DROPOUTS):
                m.eval()
    with torch.random.fork_rng(devices=[]), no_dropout():  # also functional and attention dropout
        torch.manual_seed(0)
        return model(x)


@torch.no_grad()
def output_errors(model: nn.Module, new: nn.Module, x) -> tuple[float, float]:
    """(eval error, train error); both models are copied for the train-mode forwards."""
    e_eval = relative_error(forward(model, x, False), forward(new, x, False))
    a, b = copy.deepcopy(model), copy.deepcopy(new)
    e_train = nan_max([relative_error(forward(a, x, True), forward(b, x, True)),
                       relative_error(forward(a, x, False), forward(b, x, False))])
    model.eval()
    new.eval()
    return e_eval, e_train


def changed_masks(model: nn.Module, new: nn.Module) -> dict[str, torch.Tensor]:
    """Per parameter of ``model`` (by name; tied ones once), which elements the transformed copy changed."""
    new_params = dict(new.named_parameters())
    out = {}
    for name, p in model.named_parameters():
        q = new_params.get(name)
        if q is None or q.shape != p.shape:
            out[name] = torch.ones(p.shape, dtype=torch.bool)  # replaced: every element differs
        else:
            out[name] = (q.detach() != p.detach()).cpu()
    return out


def changed_share(model: nn.Module, new: nn.Module) -> tuple[int, int]:
    """(changed elements, all elements) over the parameters of ``model`` (by name; tied ones once)."""
    masks = changed_masks(model, new)
    return sum(int(m.sum()) for m in masks.values()), sum(m.numel() for m in masks.values())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def to_device(x, device):
    """``x`` (a tensor or a tuple of them) on ``device``."""
    return tuple(to_device(t, device) for t in x) if isinstance(x, (tuple, list)) else x.to(device)


def measure(name: str, builder, seeds: int, device: str = "cpu") -> dict:
    model, x = builder(dtype=torch.float64)
    model, x = model.to(device), to_device(x, device)
    before = snapshot(model)
    row = {"name": name, "params": replicas.parameter_count(model)}
    try:
        t0 = time.perf_counter()
        spec = symmetry_spec(model, x)
        row["t_spec"] = time.perf_counter() - t0
    except Exception as err:  # report honestly, keep going
        row["error"] = f"symmetry_spec: {type(err).__name__}: {str(err).strip().splitlines()[0][:150]}"
        return row
    row["spaces"], row["pinned"] = len(spec.spaces), len(spec.pinned)
    # a float64 model whose graph casts to float32 inside (transformers' RMSNorm) agrees to float32 rounding
    row["f32"] = spec.lower_precision_inside and next(model.parameters()).dtype == torch.float64
    row["pinned_reasons"] = dict(spec.pinned)
    shares, e_eval, e_train, reach = [], [], [], None
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        try:
            t0 = time.perf_counter()
            new = apply_symmetry(model, random_symmetry(spec, g), spec)
            row["t_apply"] = time.perf_counter() - t0
        except Exception as err:
            row["error"] = f"random/apply_symmetry: {type(err).__name__}: {str(err).strip().splitlines()[0][:150]}"
            return row
        masks = changed_masks(model, new)
        total = sum(m.numel() for m in masks.values())
        shares.append(sum(int(m.sum()) for m in masks.values()) / total)
        reach = masks if reach is None else {k: reach[k] | m for k, m in masks.items()}
        ev, tr = output_errors(model, new, x)
        e_eval.append(ev)
        e_train.append(tr)
    row["changed"] = min(shares)  # the smallest over the seeds
    row["reach"] = sum(int(m.sum()) for m in reach.values()) / total  # changed by at least one of the seeds
    row["eval"], row["train"] = nan_max(e_eval), nan_max(e_train)
    row["untouched"] = same(before, snapshot(model))
    return row


def wide_hf(family: str, width: int, dtype):
    """A tiny-config transformers model at ``width`` channels (heads of width 64, at least 4), random norms."""
    from intertwiners.model_specs import hf_tiny

    model = hf_tiny(family, width=width, heads=max(4, width // 64)).to(dtype)
    g = torch.Generator().manual_seed(1)
    replicas.randomize_norms(model, g)
    replicas._randomize_rms_norms(model, g)
    return model, torch.randint(0, model.config.vocab_size, (replicas.BATCH, replicas.TOKENS), generator=g)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3,
                   help="random elements per model (the smallest share is kept; reach: changed by any of them)")
    p.add_argument("--only", nargs="*", default=None, help="only these replicas (names as in tests/replicas.py)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers models")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    p.add_argument("--reasons", action="store_true", help="print why each pinned space is pinned")
    p.add_argument("--device", default="cpu", help="run every model there (e.g. cuda: the GPU check)")
    p.add_argument("--wide", type=int, default=0, metavar="W",
                   help="also the permutation-only families (ConvNeXt, MLP-Mixer) and the tiny transformers at width "
                        "W: at the replicas' widths (8-64) a random permutation leaves 1/width of the rows in place")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    builders = dict(replicas.REPLICAS)
    if not args.no_hf:
        try:
            import transformers  # noqa: F401

            builders.update({f"hf_{k}": v for k, v in replicas.HF_REPLICAS.items()})
            builders.update({f"hf_{k}": (lambda dtype, k=k: replicas.hf_family(k, dtype=dtype))
                             for k in replicas.HF_FAMILIES})
        except ImportError:
            print("transformers is not installed: the GPT-2/BERT/Llama rows are skipped")
    if args.wide:
        w = args.wide
        builders[f"convnext_w{w}"] = lambda dtype: replicas.convnext(dtype=dtype, width=w)
        builders[f"mlp_mixer_w{w}"] = lambda dtype: replicas.mlp_mixer(dtype=dtype, width=w)
        if not args.no_hf:
            for fam in ("gpt2", "bert", "bert-mlm", "llama"):
                builders[f"hf_{fam}_w{w}"] = lambda dtype, fam=fam: wide_hf(fam, w, dtype)
    if args.only:
        builders = {k: v for k, v in builders.items() if k in args.only}

    rows = [measure(name, b, args.seeds, args.device) for name, b in builders.items()]
    head = f"{'model':<18}{'params':>8}{'spaces':>8}{'pinned':>8}{'changed':>10}{'reach':>8}{'eval err':>11}" \
           f"{'train err':>11}" \
           f"{'untouched':>11}{'spec s':>8}{'apply s':>9}"
    print(f"device: {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<18}{r['params']:>8}  ERROR {r['error']}")
            continue
        name = r["name"] + ("*" if r["f32"] else "")
        print(f"{name:<18}{r['params']:>8}{r['spaces']:>8}{r['pinned']:>8}{100 * r['changed']:>9.1f}%"
              f"{100 * r['reach']:>7.1f}%"
              f"{r['eval']:>11.1e}{r['train']:>11.1e}{str(r['untouched']):>11}{r['t_spec']:>8.2f}{r['t_apply']:>9.3f}")
    shares = [r.get("changed", 0.0) for r in rows]
    analysed = [r for r in rows if "error" not in r]
    exact = [r for r in analysed if not r["f32"]]
    worst = nan_max([r["eval"] for r in exact] + [r["train"] for r in exact])
    worst32 = nan_max([r["eval"] for r in analysed if r["f32"]] + [r["train"] for r in analysed if r["f32"]])
    print("-" * len(head))
    print(f"average share of parameter elements changed: {100 * sum(shares) / max(len(shares), 1):.1f}% over "
          f"{len(rows)} models (an analysis error counts as 0%); smallest {100 * min(shares, default=0):.1f}%")
    print(f"max relative output error, eval and train, over the {len(exact)} models computing in float64 "
          f"throughout: {worst:.1e} (goal <= 1e-9: {'met' if worst <= 1e-9 else 'NOT met'}); over the "
          f"{len(analysed) - len(exact)} that cast to float32 inside (marked *): {worst32:.1e} (float32 rounding; "
          f"goal <= 1e-5: {'met' if worst32 <= 1e-5 else 'NOT met'}); models with an analysis error: "
          f"{len(rows) - len(analysed)}; original untouched: {all(r['untouched'] for r in analysed)}")
    print(f"goals: >= 90% on every model: {'met' if min(shares, default=0) >= 0.9 else 'NOT met'}; "
          f">= 97% on average: {'met' if sum(shares) / max(len(shares), 1) >= 0.97 else 'NOT met'}")
    if args.reasons:
        for r in rows:
            for space, reason in r.get("pinned_reasons", {}).items():
                print(f"  {r['name']}: {space}: {reason}")


if __name__ == "__main__":
    main()
