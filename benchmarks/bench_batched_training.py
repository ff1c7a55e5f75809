"""Batched training: K Myrtle CNNs on digits trained together (``batched.fit_many``) against one after another
(``training.fit``), the same epochs, seeds and recipe, timed in the same run (issue 19: goal >= 4x on 2 cores).

Prints both wall times, their ratio, and each model's test accuracy both ways (they train the same models:
tests/test_batched.py checks the weights agree). It also prints the ceiling any batching has on this machine:
the arithmetic of the run (floating-point operations of every training step and validation pass, counted by
``torch.utils.flop_counter``) divided by the wall times gives each way's rate, and a large matrix product timed
in the same run (the best rate this CPU reaches with these threads) divided by the one-after-another rate is
the most that training the same arithmetic together could gain::

    PYTHONPATH=src python benchmarks/bench_batched_training.py [--models 8] [--epochs 3] [--threads 2] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch

from intertwiners import data
from intertwiners.batched import evaluate_many, fit_many
from intertwiners.stats import mean_ci
from intertwiners.training import accuracy, build_for, fit, recipe_for


def training_flops(model, dataset, recipe, fit_n: int, val_n: int, epochs: int) -> float:
    """Floating-point operations of ``epochs`` epochs of one model: a forward and backward pass per training
    batch, a forward pass over the validation split per epoch (torch's flop counter, one multiply-add = 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    m = copy.deepcopy(model).train()
    x = dataset.x[:recipe.batch_size]
    with FlopCounterMode(display=False) as count:
        m(x).sum().backward()
    step = count.get_total_flops()
    with FlopCounterMode(display=False) as count, torch.no_grad():
        m.eval()(x[:1])
    per_image = count.get_total_flops()
    return epochs * (math.ceil(fit_n / recipe.batch_size) * step + val_n * per_image)


def matmul_rate(threads: int, n: int = 2048, repeats: int = 10, device: str = "cpu") -> float:
    """GFLOP/s of an n x n float32 matrix product with the current threads (the best of ``repeats`` runs)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    sync()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the cores of the machine)")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--device", default="cpu", help="where both ways train (e.g. cuda)")
    args = parser.parse_args()
    dev = args.device
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    torch.set_num_threads(args.threads)
    train, test = data.load(args.dataset)
    recipe = recipe_for(args.dataset, epochs=args.epochs, patience=None)      # every epoch, both ways
    fit_train, val = train.split(recipe.val_fraction, seed=0)
    seeds = list(range(args.models))
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(build_for("myrtle_cnn", train))
    alone = [copy.deepcopy(m) for m in models]

    t0 = time.perf_counter()
    for m, seed in zip(alone, seeds):
        fit(m, fit_train, val, recipe, seed, dev, progress=False)
    sync()
    sequential = time.perf_counter() - t0
    t0 = time.perf_counter()
    fit_many(models, fit_train, val, recipe, seeds, dev, progress=False)
    sync()
    together = time.perf_counter() - t0

    flops = training_flops(models[0], fit_train, recipe, len(fit_train), len(val), args.epochs) * args.models
    peak = matmul_rate(args.threads, device=dev)
    acc_alone = [accuracy(m, test, dev) for m in alone]
    acc_together = [a for a, _ in evaluate_many(models, test, dev)]
    where = torch.cuda.get_device_name() if dev.startswith("cuda") else f"{args.threads} threads"
    print(f"{args.models} Myrtle CNNs on {args.dataset}, {args.epochs} epochs each, {where}")
    print(f"one after another: {sequential:.1f} s; together: {together:.1f} s; ratio {sequential / together:.2f}x")
    for name, accs in (("one after another", acc_alone), ("together", acc_together)):
        ci = mean_ci(accs)
        print(f"test accuracy, {name}: " + ", ".join(f"{a:.2f}" for a in accs)
              + f"; mean {ci.mean:.2f} [{ci.low:.2f}, {ci.high:.2f}]")
    print(f"largest difference per model: {max(abs(a - b) for a, b in zip(acc_alone, acc_together)):.2f} points")
    rate_alone, rate_together = flops / sequential / 1e9, flops / together / 1e9
    print(f"arithmetic: {flops / 1e9:.0f} GFLOP in all; one after another {rate_alone:.1f} GFLOP/s, together "
          f"{rate_together:.1f} GFLOP/s; a 2048x2048 matrix product ({where}): {peak:.1f} GFLOP/s")
    print(f"ceiling of any batching of this arithmetic here: {peak / rate_alone:.2f}x "
          f"(together reaches {rate_together / peak:.0%} of the matrix product's rate)")


if __name__ == "__main__":
    main()
