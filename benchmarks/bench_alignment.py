"""Benchmark: aligning models through their intertwiner groups.

1. Activation alignment of two ResNet20s (random weights, batch norm calibrated on the data) on the digits
   test set (360 images, 16x16), against one forward pass of one model over the same data. Goal: < 10 s.
2. Weight matching of two ResNet-50-sized networks with random weights (the builder of
   bench_symmetries.py; example input 1x3x64x64, the spec only needs shapes), against one forward pass of a
   batch of 8 at 224x224. Goal: < 60 s.
3. ``--planted``: planted recovery, 100 trials per model family and method: align g·M to M for
   g = random_symmetry(spec) and count the trials whose parameters come back to relative error <= 1e-6.
   ``--planted-set gl`` / ``torchvision-resnet``: only the GL families of tests/test_alignment_linear_spaces.py
   (two linear maps with nothing between), respectively torchvision-style ResNet-18/50 replicas (tests/replicas.py,
   random weights, 32x32 inputs), each trial a new model and a new element, through the public ``align``.
   ``--planted-set mlp-widths``: residual self-map MLPs (two blocks ``h + relu(b(h))``) at widths 1, 2, 3, 8,
   64, 256, 1,024, with fewer samples than units (width // 2, at least 1) and with plenty; MLPs with dead units;
   a tanh recurrent cell (one weight applied 3 times). At most 5 trials at width 256 and 3 at 1,024.
4. ``--lmc``: train pairs of Myrtle CNNs (width 16, 64) and ResNet20s on digits and print the barriers of
   (1-alpha)·A + alpha·B for no alignment, permutations only, the full group and the full group + REPAIR
   (both methods). ``--no-norm`` does the same for networks without batch norm (Myrtle CNN width 16 without
   batch norm, the digits MLP 256-128-128-10), where REPAIR has something to correct.
5. ``--merge [--group permutation]``: merge three trained models per architecture (the ``--lmc`` models, seeds
   0-2) and print the test accuracy of each model, of their unaligned average, of the average after aligning
   every model to the first (``max_rounds=0``) and after MergeMany rounds, by both methods.
6. ``--memory``: peak resident memory of weight matching (``align(..., method="weights")``) of two random
   GPT-2-small-sized models (124M parameters; ``--layers`` fewer for a quick look), as a multiple of one model's
   parameter bytes, with the peak of each stage (sampled every 20 ms). Run it in its own process.
7. ``--job-cost``: the compute of one ``alignment_barrier`` job of ``intertwiners reproduce --scale small``
   (``compare_alignments`` on a trained pair with the scale's alphas, variants and training images) for the
   Myrtle CNN and the ResNet20 of ``--lmc``, against the settings the small scale had before (11 alphas, five
   variants without REPAIR, 1,000 images), timed in the same run.

    python benchmarks/bench_alignment.py [--threads 1] [--skip-resnet50] [--planted [--trials 100]
                                         [--transformers-only] [--planted-set {all,gl,torchvision-resnet,mlp-widths}]]
                                         [--lmc [--no-norm]] [--merge] [--memory]
                                         [--job-cost]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_symmetries import ResNet50  # noqa: E402

from intertwiners import data, models  # noqa: E402
from intertwiners.alignment import align  # noqa: E402
from intertwiners.alignment.interpolation import recompute_batchnorm  # noqa: E402
from intertwiners.symmetries import symmetry_spec  # noqa: E402


def forward_time(model, x, batch_size=256) -> float:
    with torch.no_grad():
        model(x[:2])
        t = time.perf_counter()
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
    return time.perf_counter() - t


def bench_resnet20(threads: int) -> None:
    train, _ = data.load("digits")
    x = train.x
    torch.manual_seed(0)
    a = models.resnet20(in_channels=1).eval()
    b = models.resnet20(in_channels=1).eval()
    recompute_batchnorm(a, x, len(x)).eval()
    recompute_batchnorm(b, x, len(x)).eval()
    t_fwd = forward_time(a, x)
    symmetry_spec(models.mlp(2, hidden=(2,)), torch.randn(2, 2))  # one-time imports (torch.fx shape propagation)
    t = time.perf_counter()
    r = align(a, b, x, method="activations", threads=threads)
    t_align = time.perf_counter() - t
    print(f"ResNet20 x2, activation alignment on the digits training set ({len(x)} images {tuple(x.shape[1:])}): "
          f"{t_align:.2f} s = {t_align / t_fwd:.1f} x one forward pass ({t_fwd:.3f} s); "
          f"{len(r.elements)} spaces; goal < 10 s: {'met' if t_align < 10 else 'NOT met'}")


def bench_resnet50(threads: int) -> None:
    torch.manual_seed(0)
    a, b = ResNet50().eval(), ResNet50().eval()
    x = torch.randn(8, 3, 224, 224)
    with torch.no_grad():
        a(x[:1])
        t = time.perf_counter()
        a(x)
        t_fwd = time.perf_counter() - t
    example = torch.randn(1, 3, 64, 64)
    t = time.perf_counter()
    r = align(a, b, example_input=example, method="weights", monomial=True, threads=threads)
    t_align = time.perf_counter() - t
    n = sum(p.numel() for p in a.parameters())
    print(f"ResNet-50-sized x2 ({n / 1e6:.2f}M parameters), weight matching (full group, {r.sweeps} sweeps): "
          f"{t_align:.2f} s = {t_align / t_fwd:.1f} x one forward pass of 8 at 224x224 ({t_fwd:.2f} s); "
          f"{len(r.elements)} spaces; goal < 60 s: {'met' if t_align < 60 else 'NOT met'}")


def planted(trials: int, first: int = 0) -> None:
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from test_alignment import planted_trials, positive_biases, ready

    torch.manual_seed(0)
    x_mlp = torch.randn(4096, 8, dtype=torch.float64)
    x_img = torch.randn(96, 1, 8, 8, dtype=torch.float64)
    x_res = torch.randn(24, 1, 8, 8, dtype=torch.float64)
    families = [
        ("MLP widths 3-16", lambda w: positive_biases(models.mlp(8, hidden=(3 + w % 14, 3 + (7 * w) % 14))), x_mlp),
        ("MLP width 512", lambda w: positive_biases(models.mlp(8, hidden=(512,))), x_mlp),
        ("Myrtle CNN + BN (w=4)", lambda w: models.myrtle_cnn(width=4, in_channels=1, input_size=8), x_img),
        ("Myrtle CNN, no BN (w=4)", lambda w: positive_biases(models.myrtle_cnn(width=4, in_channels=1, input_size=8,
                                                                                batch_norm=False)), x_img),
        ("ResNet20 option A (4/8/16)", lambda w: models.resnet20(shortcut="A", in_channels=1, widths=(4, 8, 16)),
         x_res),
        ("ResNet20 option B (4/8/16)", lambda w: models.resnet20(shortcut="B", in_channels=1, widths=(4, 8, 16)),
         x_res),
    ]
    for name, build, x in families[first:]:  # biases > 0 where there is no batch norm: every unit fires
        for method in ("weights", "activations"):
            t = time.perf_counter()
            ok = redrawn = 0
            models_used, seed = 10, 0  # 10 models x (trials / 10) planted elements each
            while models_used:
                torch.manual_seed(seed)
                model = ready(build(seed), x)
                seed += 1
                try:
                    ok += planted_trials(model, x, method, trials // 10, seed=seed)
                except AssertionError:  # a unit never fires on the data: not a valid activation test
                    redrawn += 1
                    continue
                models_used -= 1
            print(f"planted recovery, {name:<28} {method:<11}: {ok}/{trials} ({time.perf_counter() - t:.1f} s"
                  f"{f'; {redrawn} model(s) redrawn: a unit never fired on the data' if redrawn else ''})",
                  flush=True)


def planted_transformers(trials: int) -> None:
    """Planted recovery through ``align`` with an element of the *whole* group (attention heads and their
    per-head maps included): the transformer block of the tests, and tiny GPT-2 and Llama models."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    import replicas
    from test_alignment import TinyTransformerBlock, relerr

    import intertwiners as it

    torch.manual_seed(14)
    block = TinyTransformerBlock().double().eval()
    x_block = torch.randn(64, 5, 4, dtype=torch.float64)
    cases = [("transformer block", block, x_block, x_block, ("weights", "activations"))]
    try:
        for fam in ("gpt2", "llama"):
            model, ids = replicas.HF_REPLICAS[fam](dtype=torch.float64)
            cases.append((f"{fam} (tiny, transformers)", model, ids, None, ("weights",)))
    except Exception as err:  # noqa: BLE001 - transformers missing: the block alone
        print(f"transformers families skipped: {type(err).__name__}: {err}")
    for name, model, example, data_, methods in cases:
        spec = it.symmetry_spec(model, example)
        readable = [n for n, s in spec.spaces.items() if s.sites or s.kind == "attention_heads"]
        for method in methods:
            t, ok = time.perf_counter(), 0
            gen = torch.Generator().manual_seed(0)
            for _ in range(trials):
                g = it.random_symmetry(spec, gen)
                if method == "activations":  # the residual stream has no activation sites to read
                    g = {n: g[n] for n in readable}
                moved = it.apply_symmetry(model, g, spec)
                r = it.align(model, moved, data_, example_input=example, method=method,
                             spaces=readable if method == "activations" else None)
                ok += relerr(model, r.model) <= 1e-6
            print(f"planted recovery, {name:<28} {method:<11}: {ok}/{trials} ({time.perf_counter() - t:.1f} s; "
                  f"{len(spec.spaces)} spaces, {sum(s.kind == 'attention_heads' for s in spec.spaces.values())} "
                  "attention)", flush=True)


class ResidualSelfMapMLP(torch.nn.Module):
    """h = relu(a(x)); h = h + relu(b_k(h)) for each block k; out = c(h): every b_k maps the space of h to itself
    (W -> P D W D^-1 P^T), and all blocks share that one space."""

    def __init__(self, width: int, inputs: int = 8, blocks: int = 2, outputs: int = 4):
        super().__init__()
        self.a = torch.nn.Linear(inputs, width)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(blocks))
        self.c = torch.nn.Linear(width, outputs)

    def forward(self, x):
        h = torch.relu(self.a(x))
        for b in self.blocks:
            h = h + torch.relu(b(h))
        return self.c(h)


class RecurrentCell(torch.nn.Module):
    """One weight applied ``steps`` times: h <- tanh(w(h) + i(x)) (signed permutations on h)."""

    def __init__(self, width: int, inputs: int = 8, steps: int = 3, outputs: int = 4):
        super().__init__()
        self.i, self.w, self.o = (torch.nn.Linear(inputs, width), torch.nn.Linear(width, width),
                                  torch.nn.Linear(width, outputs))
        self.steps = steps

    def forward(self, x):
        h = torch.tanh(self.i(x))
        for _ in range(self.steps):
            h = torch.tanh(self.w(h) + self.i(x))
        return self.o(h)


def dead_unit_mlp(width: int = 16, dead: tuple[int, int] = (4, 3), inputs: int = 8) -> torch.nn.Module:
    """8-width-width-4 ReLU MLP whose first ``dead[0]`` units of layer 1 and ``dead[1]`` of layer 2 never fire:
    their incoming weights make the pre-activation negative for every input (layer 1: bias -100 on standard
    normal data; layer 2: non-positive weights on non-negative inputs and bias -1)."""
    m = torch.nn.Sequential(torch.nn.Linear(inputs, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                            torch.nn.ReLU(), torch.nn.Linear(width, 4))
    with torch.no_grad():
        m[0].bias[:dead[0]] = -100.0
        m[2].weight[:dead[1]] = -m[2].weight[:dead[1]].abs()
        m[2].bias[:dead[1]] = -1.0
    return m


MLP_WIDTHS = (1, 2, 3, 8, 64, 256, 1024)
TRIAL_CAP = {256: 5, 1024: 3}  # at most this many trials at the widest (minutes on a shared 2-core machine)


def mlp_width_families(widths=MLP_WIDTHS) -> list:
    """(name, make(seed) -> (model, data)) of ``--planted-set mlp-widths``: residual self-map MLPs at every
    width with fewer samples than units (width // 2, at least 1) and with plenty (4 x width + 16), an MLP
    with dead units and recurrent cells (one weight applied three times), all float64."""
    out = []
    for width in widths:
        for label, rows in (("few", max(1, width // 2)), ("plenty", 4 * width + 16)):
            def make(seed, width=width, rows=rows):
                torch.manual_seed(seed)
                return ResidualSelfMapMLP(width).double().eval(), torch.randn(rows, 8, dtype=torch.float64)
            out.append((f"residual MLP w{width}, {rows} samples ({label})", make, TRIAL_CAP.get(width)))
    for width, rows in ((16, 64), (64, 512)):
        def make(seed, width=width, rows=rows):
            torch.manual_seed(seed)
            return dead_unit_mlp(width).double().eval(), torch.randn(rows, 8, dtype=torch.float64)
        out.append((f"dead units: MLP w{width} (4+3 dead), {rows} samples", make))
    for width, rows in ((5, 32), (64, 512), (64, 16)):
        def make(seed, width=width, rows=rows):
            torch.manual_seed(seed)
            return RecurrentCell(width).double().eval(), torch.randn(rows, 8, dtype=torch.float64)
        out.append((f"recurrent cell w{width} (3 steps), {rows} samples", make))
    return out


def planted_families(which: str) -> list:
    """(name, build(seed) -> (model, data), methods) of the families that ``--planted-set`` names."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    import replicas
    from test_alignment import ready
    from test_alignment_linear_spaces import FAMILIES

    out = []
    if which in ("all", "mlp-widths"):
        out += mlp_width_families()
    if which in ("all", "gl"):
        for name, (build, shape) in FAMILIES.items():
            def make(seed, build=build, shape=shape):
                torch.manual_seed(seed)
                return build().double().eval(), torch.randn(48, *shape, dtype=torch.float64)
            out.append((f"GL: {name}", make))
    if which in ("all", "torchvision-resnet"):
        for name, cls, rows in (("ResNet-18", replicas.ResNet18, 128), ("ResNet-50", replicas.ResNet50, 256)):
            for bn in ("data", "random"):
                def make(seed, cls=cls, rows=rows, bn=bn):
                    torch.manual_seed(seed)
                    model = replicas.randomize_norms(cls(), torch.Generator().manual_seed(seed + 1))
                    x = torch.randn(rows, 3, 32, 32, dtype=torch.float64)
                    return (ready(model, x) if bn == "data" else model.double().eval()), x
                out.append((f"{name}, BN stats {bn}", make))
    return out


def planted_through_align(trials: int, which: str, device: str = "cpu") -> None:
    """Planted recovery through ``align``: every trial a new model (seed) and a new element of its whole group
    (dense on GL spaces); prints exact trials, the worst relative parameter error, time and how the elements
    were found."""
    from collections import Counter

    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from test_alignment import relerr

    import intertwiners as it

    for name, make, *cap in planted_families(which):
        n_trials = min(trials, cap[0]) if cap and cap[0] else trials
        for method in ("weights", "activations"):
            t, ok, worst, how, bad = time.perf_counter(), 0, 0.0, Counter(), []
            for trial in range(n_trials):
                model, x = make(trial)
                model, x = model.to(device), x.to(device)
                spec = it.symmetry_spec(model, x[:4])
                g = it.random_symmetry(spec, torch.Generator().manual_seed(100 + trial), monomial=True)
                r = align(model, it.apply_symmetry(model, g, spec), x, method=method)
                err = relerr(model, r.model)
                ok += err <= 1e-6
                if not err <= 1e-6:
                    bad.append(trial)
                worst = err if not err <= worst else worst
                how.update(v.split(";")[0].split(",")[0] for v in r.found_by.values())
            print(f"planted recovery, {name:<38} {method:<11}: {ok}/{n_trials} (worst error {worst:.1e}; "
                  f"{time.perf_counter() - t:.1f} s; spaces found by: {dict(how)})"
                  + (f"; not exact: trials {bad}" if bad else ""), flush=True)


LMC_ARCHS = [("myrtle_cnn w16", "myrtle_cnn", {"width": 16}), ("myrtle_cnn w64", "myrtle_cnn", {"width": 64}),
             ("resnet20", "resnet20", {})]
NO_NORM_ARCHS = [("myrtle_cnn w16 no BN", "myrtle_cnn", {"width": 16, "batch_norm": False}),
                 ("mlp 128-128", "mlp", {})]


def trained_models(arch: str, kw: dict, seeds, out: Path, train, test) -> list:
    """Models trained on digits with the digits recipe (kept in ``out`` and reused)."""
    from intertwiners.training import train_one

    found = []
    tag = "".join(f"-{k}{v}" for k, v in sorted(kw.items()))
    for seed in seeds:
        folder = out / f"{arch}{tag}-seed{seed}"
        if (folder / "model.safetensors").is_file():
            found.append(models.load(folder).eval())
            continue
        model, _ = train_one(arch, "digits", seed, data=(train, test), progress=False, **kw)
        models.save(model, folder)
        found.append(model.eval())
    return found


def lmc(pairs: int, out: Path, only: list[str] | None = None, no_norm: bool = False) -> None:
    """Train pairs of models on digits and print the accuracy/loss barriers for every alignment variant."""
    import json

    from intertwiners.alignment.comparison import compare_alignments

    train, test = data.load("digits")
    archs = [a for a in (NO_NORM_ARCHS if no_norm else LMC_ARCHS) if not only or a[0] in only]
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for label, arch, kw in archs:
        for pair in range(pairs):
            a, b = trained_models(arch, kw, (2 * pair, 2 * pair + 1), out, train, test)
            t = time.perf_counter()
            comp = compare_alignments(a, b, train, test)
            row = {"model": label, "pair": pair, "barriers": comp.barriers(), "seconds": comp.seconds,
                   "total_seconds": round(time.perf_counter() - t, 1),
                   "ends": [float(comp.curves["none"].accuracy[0]), float(comp.curves["none"].accuracy[-1])]}
            results.append(row)
            print(json.dumps(row), flush=True)
    (out / ("lmc_no_norm.json" if no_norm else "lmc.json")).write_text(json.dumps(results, indent=2))


def merging(out: Path, only: list[str] | None = None, rounds: int = 5, group: str = "full") -> None:
    """Merge three digits models per architecture: accuracy of each, of the unaligned average, of the average
    after aligning to the first only, and after MergeMany rounds (both methods)."""
    import json

    import intertwiners as it

    train, test = data.load("digits")
    default = [a for a in LMC_ARCHS + NO_NORM_ARCHS if a[0] != "myrtle_cnn w64"]  # w64 trains slowly on a CPU
    archs = [a for a in LMC_ARCHS + NO_NORM_ARCHS if a[0] in only] if only else default
    out.mkdir(parents=True, exist_ok=True)
    for label, arch, kw in archs:
        three = trained_models(arch, kw, (0, 1, 2), out, train, test)
        for method in ("activations", "weights"):
            for max_rounds in (0, rounds):
                t = time.perf_counter()
                merged = it.merge(three, train.x[:1000], method=method, group=group, train_data=train,
                                  eval_data=test, max_rounds=max_rounds)
                r = merged.merge_report
                print(json.dumps({"model": label, "method": method, "group": group, "max_rounds": max_rounds,
                                  "rounds": r.rounds,
                                  "moved": r.moved, "merged": round(r.accuracy["merged"], 2),
                                  "unaligned": round(r.accuracy["unaligned average"], 2),
                                  "models": [round(v, 2) for v in r.accuracy["models"]],
                                  "seconds": round(time.perf_counter() - t, 1)}), flush=True)


def job_cost(out: Path) -> None:
    """Seconds of one small-scale alignment_barrier job's compute, now and with the earlier settings."""
    from intertwiners.alignment.comparison import VARIANTS, compare_alignments
    from intertwiners.experiments.plan import PRESETS

    small = PRESETS["small"]
    earlier = (tuple(i / 10 for i in range(11)), ("none", "permutation (activations)", "full group (activations)",
                                                  "permutation (weights)", "full group (weights)"), 1000)
    now = (small.align_alphas, small.align_variants, small.align_samples)
    train, test = data.load("digits")
    for label, arch, kw in (LMC_ARCHS[0], LMC_ARCHS[2]):
        a, b = trained_models(arch, kw, (0, 1), out, train, test)
        times = {}
        for name, (alphas, labels, samples) in (("earlier", earlier), ("now", now)):
            t = time.perf_counter()
            compare_alignments(a, b, train.x[:samples], test, alphas, [v for v in VARIANTS if v[0] in labels])
            times[name] = time.perf_counter() - t
        print(f"alignment_barrier job, {label}: {times['now']:.1f} s with the small scale's settings ({len(now[0])} "
              f"alphas, {len(now[1])} variants, {now[2]} images) vs {times['earlier']:.1f} s with the earlier ones "
              f"({len(earlier[0])}, {len(earlier[1])}, {earlier[2]}): {times['earlier'] / times['now']:.1f}x cheaper",
              flush=True)


def memory(layers: int) -> None:
    """Peak RSS of weight matching two random GPT-2-small-sized models, per stage, in units of one model."""
    import importlib
    import os
    import resource
    import threading

    import transformers as tf

    import intertwiners.symmetries as symmetries

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page / 2**20

    stage, peaks = ["build"], {}

    def sample():
        while True:
            peaks[stage[0]] = max(peaks.get(stage[0], 0.0), rss())
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    align_module = importlib.import_module("intertwiners.alignment.align")

    def staged(module, name):
        inner = getattr(module, name)

        def wrapper(*args, **kwargs):
            outer, stage[0] = stage[0], name
            try:
                return inner(*args, **kwargs)
            finally:
                stage[0] = outer
        setattr(module, name, wrapper)

    for name in ("space_slots", "canonical_scales", "match_permutations", "same_function"):
        staged(align_module, name)
    for name in ("symmetry_spec", "apply_symmetry"):
        staged(symmetries, name)
    cfg = tf.GPT2Config(n_layer=layers, use_cache=False)
    torch.manual_seed(0)
    a, b = tf.GPT2LMHeadModel(cfg).eval(), tf.GPT2LMHeadModel(cfg).eval()
    one = sum(p.numel() * p.element_size() for p in a.parameters()) / 2**20
    stage[0] = "two models loaded"
    time.sleep(0.1)
    base = rss()
    ids = torch.arange(16).reshape(2, 8)
    t = time.perf_counter()
    stage[0] = "align (other)"
    r = align(a, b, example_input=ids, method="weights", monomial=True)
    stage[0] = "done"
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"GPT-2 ({layers} layers, {one:.0f} MiB of float32 parameters per model), weight matching in {seconds:.1f} s "
          f"({r.sweeps} sweeps): RSS with the two models loaded {base:.0f} MiB = {base / one:.2f} x one model; peak "
          f"{peak:.0f} MiB = {peak / one:.2f} x one model (+{(peak - base) / one:.2f} x during align; goal: peak "
          f"<= 3 x one model: {'met' if peak <= 3 * one else 'NOT met'})")
    for name, value in sorted(peaks.items(), key=lambda kv: -kv[1]):
        print(f"  peak during {name:<22} {value:7.0f} MiB = {value / one:5.2f} x one model "
              f"(+{(value - base) / one:5.2f} over the two models)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")
    p.add_argument("--skip-resnet50", action="store_true")
    p.add_argument("--planted", action="store_true", help="run the planted-recovery trials instead")
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--first-family", type=int, default=0, help="for --planted: skip the first families")
    p.add_argument("--planted-set", default="all", choices=["all", "gl", "torchvision-resnet", "mlp-widths"],
                   help="for --planted: 'gl' (GL bottleneck families), 'torchvision-resnet' (ResNet-18/50 "
                        "replicas) or 'mlp-widths' (residual self-map MLPs of widths 1 to 1,024 with few and "
                        "many samples, dead units, a recurrent cell) alone, through align; 'all' runs every family")
    p.add_argument("--transformers-only", action="store_true",
                   help="for --planted: only the transformer block and the tiny GPT-2 / Llama (whole group)")
    p.add_argument("--lmc", action="store_true", help="train pairs on digits and measure interpolation barriers")
    p.add_argument("--pairs", type=int, default=2, help="pairs per architecture for --lmc")
    p.add_argument("--out", default="runs/bench_alignment", help="folder for --lmc models and lmc.json")
    p.add_argument("--models", nargs="*", default=None,
                   help="for --lmc/--merge: only these of 'myrtle_cnn w16', 'myrtle_cnn w64', 'resnet20' (with "
                        "--no-norm: 'myrtle_cnn w16 no BN', 'mlp 128-128')")
    p.add_argument("--no-norm", action="store_true", help="for --lmc: networks without batch norm")
    p.add_argument("--merge", action="store_true", help="merge three trained digits models per architecture")
    p.add_argument("--rounds", type=int, default=5, help="for --merge: MergeMany rounds at most")
    p.add_argument("--group", default="full", choices=["full", "permutation"],
                   help="for --merge: the group of the first alignment to the first model")
    p.add_argument("--memory", action="store_true", help="peak memory of weight matching two GPT-2-sized models")
    p.add_argument("--job-cost", action="store_true", help="compute of one small-scale alignment_barrier job")
    p.add_argument("--device", default="cpu", help="for --planted-set: run the models there (e.g. cuda)")
    p.add_argument("--layers", type=int, default=12, help="for --memory: GPT-2 layers (12: GPT-2 small)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.planted:
        if args.planted_set != "all":
            planted_through_align(args.trials, args.planted_set, args.device)
            return
        if not args.transformers_only:
            planted(args.trials, args.first_family)
            planted_through_align(args.trials, "all")
        planted_transformers(args.trials)
        return
    if args.lmc:
        lmc(args.pairs, Path(args.out), args.models, args.no_norm)
        return
    if args.merge:
        merging(Path(args.out), args.models, args.rounds, args.group)
        return
    if args.memory:
        memory(args.layers)
        return
    if args.job_cost:
        job_cost(Path(args.out))
        return
    bench_resnet20(args.threads)
    if not args.skip_resnet50:
        bench_resnet50(args.threads)


if __name__ == "__main__":
    main()
