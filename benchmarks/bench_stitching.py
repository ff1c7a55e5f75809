"""Benchmark: one stitching step vs one training step of the full model, on the same batch, same run.

A stitching step is what :func:`intertwiners.stitching.stitch` does per batch: take front's cached features
(computed once, without autograd), apply the stitching layer, run the frozen back (eval mode), back-propagate
to the layer only, step the optimiser and project (Sinkhorn for grelu). A training step is the zoo's:
train mode, forward, backward through every parameter, Adam step. Target: ratio <= 0.6.

    .venv/bin/python benchmarks/bench_stitching.py [--arch myrtle_cnn] [--batch 32] [--steps 60]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from intertwiners import data
from intertwiners.stitching.layers import make_layer
from intertwiners.stitching.stitch import _frozen_copy, fast_back, split_model, stitchable_sites
from intertwiners.training import build_for


def _time_pair(step_a, step_b, steps: int, warmup: int = 5) -> tuple[float, float]:
    """Median times of two steps measured alternately, so that both see the same machine load."""
    for _ in range(warmup):
        step_a()
        step_b()
    ta, tb = [], []
    for _ in range(steps):
        t = time.perf_counter()
        step_a()
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        step_b()
        tb.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="myrtle_cnn", choices=["myrtle_cnn", "resnet20"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--kinds", default="full,grelu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train, _ = data.load("digits")
    model = build_for(args.arch, train)
    xb, yb = train.x[: args.batch], train.y[: args.batch]

    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    model.train()

    def train_step():
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    print(f"{args.arch} on digits, batch {args.batch}, {torch.get_num_threads()} thread(s), medians of {args.steps} "
          f"alternating steps (training step of the full model vs stitching step)")
    frozen = _frozen_copy(model, torch.device("cpu"))
    model.train()
    ratios = []
    for site in stitchable_sites(frozen):
        front, back = split_model(frozen, site)
        with torch.no_grad():
            h = front(xb)
        tback, channels_last = fast_back(back, h)
        if channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        for kind in args.kinds.split(","):
            layer = make_layer(kind, h.shape[1], rank=1 if kind.startswith("low_rank") and ":" not in kind else None)
            layer.train()
            lopt = torch.optim.Adam(layer.parameters(), lr=1e-3)

            def stitch_step(tback=tback, layer=layer, h=h, lopt=lopt):
                loss = F.cross_entropy(tback(layer(h)), yb)
                reg = layer.regularizer()
                if reg is not None:
                    loss = loss + reg
                lopt.zero_grad(set_to_none=True)
                loss.backward()
                lopt.step()
                layer.project_()

            t_train, t = _time_pair(train_step, stitch_step, args.steps)
            ratios.append(t / t_train)
            print(f"  {kind:>12} at {site:>16}: stitch {1e3 * t:7.2f} ms, train {1e3 * t_train:7.2f} ms, "
                  f"ratio {t / t_train:.2f}")
    print(f"ratio stitching/training: max {max(ratios):.2f}, mean {statistics.mean(ratios):.2f} (target <= 0.6)")


if __name__ == "__main__":
    main()
