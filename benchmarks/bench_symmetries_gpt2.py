"""Benchmark: symmetry_spec + random_symmetry + apply_symmetry on a GPT-2-small-sized model (124M parameters).

The model is ``transformers.GPT2LMHeadModel(GPT2Config())`` — the default configuration, 12 layers, width
768, 12 heads, vocabulary 50257 — with random weights (nothing is downloaded). Prints the time of each step
and its ratio to one forward pass (batch 1, 128 tokens, eval mode, no autograd) timed in the same run, and
the goal of issue 10: spec + apply under 10 s on 2 cores. ``--check`` also measures the transformed copy's
relative output error (float32 here, so expect ~1e-6, not 1e-15). Needs transformers.

    python benchmarks/bench_symmetries_gpt2.py [--tokens 128] [--threads 2] [--repeats 2] [--check] [--monomial]
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_symmetries import timed  # the same best-of-k timer (benchmarks/ is on sys.path when run as a script)

from intertwiners.symmetries import apply_symmetry, random_symmetry, symmetry_spec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128, help="sequence length of the forward baseline and the spec input")
    p.add_argument("--threads", type=int, default=2, help="torch threads (0: torch default)")
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    p.add_argument("--check", action="store_true", help="also measure the output error of the transformed copy")
    p.add_argument("--spec-tokens", type=int, default=32,
                   help="sequence length for the symmetry_spec(check=False) row (issue 18: batch 1 x 32 tokens)")
    p.add_argument("--monomial", action="store_true",
                   help="random_symmetry(..., monomial=True): (perm, scale) elements where the engine offers them")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import transformers
    except ImportError:
        print("transformers is not installed; nothing to measure")
        return
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(use_cache=False)).eval()
    t_build = time.perf_counter() - t0
    n_params = sum(q.numel() for q in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    print(f"GPT-2 small (transformers {transformers.__version__}, random weights): {n_params / 1e6:.1f}M parameters; "
          f"torch threads {torch.get_num_threads()}; input 1 x {args.tokens} tokens; built in {t_build:.1f} s")
    with torch.no_grad():
        model(ids)  # warm-up
        t_fwd, reference = timed(lambda: model(ids), args.repeats)
    rows = [(f"forward, batch 1, {args.tokens} tokens (baseline)", t_fwd)]
    # issue 18: the analysis alone (no safety check) on batch 1 x 32 tokens, against a forward of that input
    short = ids[:, :args.spec_tokens]
    with torch.no_grad():
        t_fwd_short, _ = timed(lambda: model(short), args.repeats)
    # the first call in a process also imports torch's tracer (torch._dynamo, ~1-2 s, once per process)
    t_first, _ = timed(lambda: symmetry_spec(model, short, check=False), 1)
    t_derive, _ = timed(lambda: symmetry_spec(model, short, check=False), args.repeats)
    try:
        t_spec, spec = timed(lambda: symmetry_spec(model, ids), args.repeats)
    except Exception as err:
        print(f"symmetry_spec failed: {type(err).__name__}: {str(err).strip().splitlines()[0]}")
        print(f"  {rows[0][0]:<52} {t_fwd:8.3f} s")
        print("goal: spec + apply under 10 s -> NOT met (no analysis)")
        return
    g = torch.Generator().manual_seed(0)
    extra = {"monomial": True} if args.monomial else {}
    t_rand, elements = timed(lambda: random_symmetry(spec, g, **extra), args.repeats)
    t_apply, new = timed(lambda: apply_symmetry(model, elements, spec), args.repeats)
    total = t_spec + t_rand + t_apply
    print(f"spaces: {len(spec.spaces)} ({sum(s.size for s in spec.spaces.values())} channels), "
          f"pinned: {len(spec.pinned)}")
    rows += [("symmetry_spec", t_spec), (f"random_symmetry{'(monomial=True)' if args.monomial else ''}", t_rand),
             ("apply_symmetry", t_apply),
             ("TOTAL spec + random + apply", total)]
    for name, t in rows:
        print(f"  {name:<52} {t:8.3f} s   {t / t_fwd:8.1f} x forward")
    print(f"goal: spec + apply under 10 s -> {'met' if total < 10 else 'NOT met'} ({total:.2f} s)")
    print(f"  {'forward, batch 1, ' + str(short.shape[1]) + ' tokens':<52} {t_fwd_short:8.3f} s")
    print(f"  {'symmetry_spec(check=False), first call':<52} {t_first:8.3f} s   "
          f"{t_first / t_fwd_short:8.1f} x forward of the same input (imports torch's tracer once per process)")
    print(f"  {'symmetry_spec(check=False), later calls':<52} {t_derive:8.3f} s   "
          f"{t_derive / t_fwd_short:8.1f} x forward of the same input (issue 18 goal <= 5x: "
          f"{'met' if t_derive <= 5 * t_fwd_short else 'NOT met'})")
    if args.check:
        with torch.no_grad():
            a, b = reference.logits, new(ids).logits
        print(f"check: max relative output error {float((a - b).abs().max() / a.abs().max()):.2e} (float32)")


if __name__ == "__main__":
    main()
