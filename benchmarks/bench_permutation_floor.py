"""Permutation tests at their floor (issue 19): ratios against baselines timed in the same run.

    python benchmarks/bench_permutation_floor.py [--permutations 1000] [--repeats 3] [--quick] [--sections 123]

1. linear CKA, ``permutation_test`` (1,000 permutations) over a plain batched-product evaluation of the same
   1,000 statistics: X' [Y_p1 ... Y_pb] by ``torch.matmul`` in batches, then |.|_F^2 over the self terms
   (biased CKA; the target is <= 1.5x), for N in {1000, 2000} and d in {64, 256};
2. G_ReLU-CKA, ``permutation_test`` over the previous implementation (Gram matrices, then the float64
   re-indexed contraction of every permutation; its kernel is kept here as the baseline): target <= 1x;
3. Procrustes (orthogonal and G_ReLU groups), sequential test (h = 10, at most 1,000 permutations) when
   the observed value is typical (unrelated X, Y) and extreme (Y = X P D + noise): mean number of
   permutations over a few generators and the time over the fixed 1,000-permutation test.

Times are the best of ``--repeats`` wall-clock runs after a warm-up.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from bench_similarity import timed  # best wall and CPU time of a few runs (this folder is on sys.path)
from numba import njit, prange

from intertwiners import similarity as sim
from intertwiners.similarity.hsic import centred_gram
from intertwiners.similarity.kernels import gram
from intertwiners.similarity.permutation import permutations


def batched_product_linear_cka(x: torch.Tensor, y: torch.Tensor, perms: np.ndarray, batch: int = 64):
    """The baseline: biased linear CKA of X with every shuffled Y from plain batched matrix products."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    norm = torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)
    idx = torch.as_tensor(perms)
    out = [torch.linalg.matrix_norm(torch.matmul(xc.T, yc[p])) ** 2 / norm for p in idx.split(batch)]
    return torch.cat(out).numpy()


@njit(parallel=True, cache=True, fastmath=False)
def _previous_permuted_inners(kc, lc, perms):
    """The previous implementation's null kernel (float64, one permutation per thread)."""
    n_perm, n = perms.shape
    out = np.empty(n_perm)
    for b in prange(n_perm):
        p = perms[b]
        upper = 0.0
        diag = 0.0
        for i in range(n):
            ki = kc[i]
            li = lc[p[i]]
            diag += ki[i] * li[p[i]]
            acc = 0.0
            for j in range(i + 1, n):
                acc += ki[j] * li[p[j]]
            upper += acc
        out[b] = 2.0 * upper + diag
    return out


def previous_grelu_test(x, y, perms):
    kc = centred_gram(gram(x, "max", name="X"), "unbiased").to(torch.float64).numpy()
    lc = centred_gram(gram(y, "max", name="Y"), "unbiased").to(torch.float64).numpy()
    return _previous_permuted_inners(np.ascontiguousarray(kc), np.ascontiguousarray(lc), perms.astype(np.int32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--permutations", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="N = 1000 only, one repeat")
    ap.add_argument("--sections", default="123", help="which parts to run, e.g. 3 (default: 123)")
    args = ap.parse_args()
    reps = 1 if args.quick else args.repeats
    b = args.permutations
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 4, generator=g)
    sim.permutation_test(x0, x0, "grelu_cka", 2)           # compile the numba kernels before timing
    previous_grelu_test(x0, x0, permutations(16, 2, 0))
    print(f"{b} permutations, best of {reps} (torch threads: {torch.get_num_threads()})")

    if "1" in args.sections:
        linear_cka(args, g, reps, b)
    if "2" in args.sections:
        grelu_cka(g, reps, b)
    if "3" in args.sections:
        sequential_procrustes(g, reps, b)


def linear_cka(args, g, reps, b):
    print("\n1. linear CKA: permutation_test / batched-product evaluation of the same statistics (target <= 1.5x)")
    for n in (1000,) if args.quick else (1000, 2000):
        perms = permutations(n, b, 0)
        for d in (64, 256):
            x = torch.randn(n, d, generator=g)
            y = x @ torch.randn(d, d, generator=g) + torch.randn(n, d, generator=g)
            base = timed(lambda x=x, y=y, p=perms: batched_product_linear_cka(x, y, p), reps)[0]
            test = timed(lambda x=x, y=y: sim.permutation_test(x, y, "linear_cka", b, generator=0), reps)[0]
            print(f"   N = {n:5d}, d = {d:3d}: batched products {base:7.3f} s, permutation_test {test:7.3f} s, "
                  f"ratio {test / base:5.2f}x")



def grelu_cka(g, reps, b):
    print("\n2. G_ReLU-CKA: permutation_test / the previous implementation (target <= 1x)")
    for n, shape in ((1000, (64,)), (1000, (256,))):
        perms = permutations(n, b, 0)
        x = torch.relu(torch.randn(n, *shape, generator=g))
        y = torch.relu(x + torch.randn(n, *shape, generator=g))
        base = timed(lambda x=x, y=y, p=perms: previous_grelu_test(x, y, p), reps)[0]
        test = timed(lambda x=x, y=y: sim.permutation_test(x, y, "grelu_cka", b, generator=0), reps)[0]
        print(f"   N = {n:5d}, d = {shape[0]:3d}: previous {base:7.3f} s, permutation_test {test:7.3f} s, "
              f"ratio {test / base:5.2f}x")



def sequential_procrustes(g, reps, b):
    print("\n3. Procrustes, sequential test (h = 10, at most B) / fixed B-permutation test")
    n, d = 1000, 64
    x = torch.relu(torch.randn(n, d, generator=g))
    cases = {"typical": torch.relu(torch.randn(n, d, generator=g)),
             "extreme": x[:, torch.randperm(d, generator=g)] * 2 + 0.5 * torch.randn(n, d, generator=g)}
    for measure in ("procrustes_orthogonal", "procrustes_grelu"):
        for case, y in cases.items():
            fixed = timed(lambda y=y, m=measure: sim.permutation_test(x, y, m, b, generator=0), 1)[0]
            runs = [sim.permutation_test(x, y, measure, b, generator=s, sequential=True, h=10) for s in range(5)]
            seq = timed(lambda y=y, m=measure: sim.permutation_test(x, y, m, b, generator=0, sequential=True,
                                                                      h=10), reps)[0]
            print(f"   {measure:22s} {case:7s} (N = {n}, d = {d}): mean permutations "
                  f"{np.mean([r.n_permutations for r in runs]):6.1f}, p {np.mean([r.pvalue for r in runs]):.3g}; "
                  f"sequential {seq:7.3f} s, fixed {fixed:7.3f} s, ratio {seq / fixed:5.2f}x")


if __name__ == "__main__":
    main()
