"""Batched training: K Myrtle CNNs on digits trained together (``batched.fit_many``) against one after another
(``training.fit``), the same epochs, seeds and recipe, timed in the same run (issue 19: goal >= 4x on 2 cores).

Prints both wall times, their ratio, and each model's test accuracy both ways (they train the same models:
tests/test_batched.py checks the weights agree)::

    PYTHONPATH=src python benchmarks/bench_batched_training.py [--models 8] [--epochs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from intertwiners import data
from intertwiners.batched import evaluate_many, fit_many
from intertwiners.stats import mean_ci
from intertwiners.training import accuracy, build_for, fit, recipe_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the cores of the machine)")
    parser.add_argument("--dataset", default="digits")
    args = parser.parse_args()
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
        fit(m, fit_train, val, recipe, seed, "cpu", progress=False)
    sequential = time.perf_counter() - t0
    t0 = time.perf_counter()
    fit_many(models, fit_train, val, recipe, seeds, "cpu", progress=False)
    together = time.perf_counter() - t0

    acc_alone = [accuracy(m, test, "cpu") for m in alone]
    acc_together = [a for a, _ in evaluate_many(models, test, "cpu")]
    print(f"{args.models} Myrtle CNNs on {args.dataset}, {args.epochs} epochs each, {args.threads} threads")
    print(f"one after another: {sequential:.1f} s; together: {together:.1f} s; ratio {sequential / together:.2f}x")
    for name, accs in (("one after another", acc_alone), ("together", acc_together)):
        ci = mean_ci(accs)
        print(f"test accuracy, {name}: " + ", ".join(f"{a:.2f}" for a in accs)
              + f"; mean {ci.mean:.2f} [{ci.low:.2f}, {ci.high:.2f}]")
    print(f"largest difference per model: {max(abs(a - b) for a, b in zip(acc_alone, acc_together)):.2f} points")


if __name__ == "__main__":
    main()
