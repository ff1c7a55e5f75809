"""The machine's speed, for comparing timings taken at different times: one Adam step of the Fig. 3 ResNet
(:mod:`intertwiners.dissection.fig3_models`, stage widths 16/32/64) on a batch of 32 RGB images of 32x32, channels
last, one torch thread. Prints the mean time per step over ``--steps`` steps after a warm-up (docs/reproduce.md
quotes it beside each timing of the main job: 204-235 ms on the 2-core machine of 2026-12-06)::

    PYTHONPATH=src python benchmarks/bench_reference_step.py [--steps 20]
"""

from __future__ import annotations

import argparse
import time

import torch

from intertwiners.dissection.fig3_models import build_fig3_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_fig3_model("resnet", 4, (16, 32, 64), 2, 3).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.randn(32, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (32,))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    print(f"reference step: {(time.perf_counter() - start) / args.steps * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
