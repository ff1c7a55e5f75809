"""Cost of a 1,000-permutation test of linear and G_ReLU-CKA against one evaluation of the measure.

    python benchmarks/bench_permutation_test.py [--n 1000] [--permutations 1000] [--repeats 3]

For each feature shape, the baseline is one call of the measure itself (``sim.cka`` / ``sim.grelu_cka``)
on the same X, Y, timed in the same run; the ratio (target: at most 20x) is the permutation test's time
over the baseline's, best of ``--repeats`` after a warm-up, wall clock and CPU time (all threads). The null costs O(N^2)
per permutation whatever the width d, while one evaluation costs O(N^2 d) (Gram matrices) or O(N d^2)
(linear CKA's feature route), so the ratio is largest for narrow features.
"""

from __future__ import annotations

import argparse

import torch
from bench_similarity import timed  # best wall and CPU time of a few runs (this folder is on sys.path)

from intertwiners import similarity as sim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--permutations", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    shapes = [(args.n, 64), (args.n, 512), (args.n, 64, 8, 8)]
    measures = {"linear_cka": lambda x, y: sim.cka(x, y), "grelu_cka": lambda x, y: sim.grelu_cka(x, y)}
    x0 = torch.randn(16, 4, generator=g)
    sim.permutation_test(x0, x0, "grelu_cka", 2)   # compile the numba kernels before timing
    print(f"N = {args.n}, {args.permutations} permutations, best of {args.repeats} (torch threads: "
          f"{torch.get_num_threads()})")
    print(f"{'measure':>11} {'features':>16} {'one evaluation':>22} {'permutation test':>22} {'ratio wall/CPU':>16}")
    for shape in shapes:
        x = torch.relu(torch.randn(*shape, generator=g))
        y = torch.relu(x + torch.randn(*shape, generator=g))
        for name, measure in measures.items():
            base = timed(lambda m=measure, x=x, y=y: m(x, y), args.repeats)
            test = timed(lambda n=name, x=x, y=y: sim.permutation_test(x, y, n, args.permutations, generator=0),
                        args.repeats)
            print(f"{name:>11} {str(tuple(shape[1:])):>16} {base[0]:9.4f} s / {base[1]:6.4f} s "
                  f"{test[0]:9.4f} s / {test[1]:6.4f} s {test[0] / base[0]:7.1f}x / {test[1] / base[1]:5.1f}x")


if __name__ == "__main__":
    main()
