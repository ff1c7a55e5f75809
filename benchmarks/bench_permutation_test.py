"""Cost of permutation tests, each against a baseline timed in the same run (issue 19's floors).

    python benchmarks/bench_permutation_test.py [--permutations 1000] [--repeats 3] [--today REV] [--quick]

1. Linear CKA, 1,000 permutations, N in {1000, 2000}, d in {64, 256}: ``permutation_test`` against a plain
   batched-product evaluation of the same 1,000 null statistics (Y's centred columns gathered by each
   permutation, X'Y_pi as one batched matrix product, the unbiased HSIC_1 terms from it; the two nulls are
   also compared). Target: ratio <= 1.5.
2. G_ReLU-CKA, 1,000 permutations: ``permutation_test`` today against the implementation at git revision
   ``--today`` (default a9e531d, before issue 19), loaded from git into this process. Target: ratio <= 1.
3. Procrustes (orthogonal), sequential Monte Carlo (Besag & Clifford, h = 10, at most 1,000 draws): the mean
   number of permutations and the time when the observed value is typical (independent X, Y) and when it is
   extreme (related X, Y), against the fixed 1,000-permutation test on the same data.
4. Procrustes on spatial features (a digits Myrtle CNN's four layers: N = 400 images, 16x16, 16x16, 8x8, 4x4
   positions, 16-128 channels; 500 permutations as in Table 2's ``small`` jobs): the X'Y_pi of the route
   ``permutation_test`` takes (pairwise sample blocks from ``PAIRWISE_POSITIONS`` positions on) against the
   batched products alone.

Times are the best wall-clock time of ``--repeats`` runs after a warm-up.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from intertwiners import similarity as sim
from intertwiners.similarity.permutation import permutations


def best(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def batched_product_null(x: torch.Tensor, y: torch.Tensor, perms: np.ndarray, chunk: int = 50) -> np.ndarray:
    """The baseline: linear CKA (unbiased HSIC_1) of X against each Y_pi by batched matrix products.

    HSIC_1 = [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)), K~ = K with a zero diagonal,
    written with the features: tr(K~L~_pi) = |X'Y_pi|^2 - sum_i K_ii L_pi(i)pi(i)."""
    n, work = x.shape[0], x.dtype              # products in the features' dtype, as the test runs them
    x = (x - x.mean(0)).double()
    y = (y - y.mean(0)).double()
    xw, yw = x.T.to(work).contiguous(), y.to(work)

    sx, kd = x.sum(0), (x * x).sum(1)          # column sums, diagonal of K
    sy, ld = y.sum(0), (y * y).sum(1)
    kr, lr = x @ sx - kd, y @ sy - ld
    ks, ls = float(sx @ sx - kd.sum()), float(sy @ sy - ld.sum())

    def hsic(m, kdl, krl):
        fro = (m * m).sum((-2, -1))
        return (fro - kdl + ks * ls / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * krl) / (n * (n - 3))

    kk = float(hsic(x.T @ x, (kd * kd).sum(), (kr * kr).sum()))
    ll = float(hsic(y.T @ y, (ld * ld).sum(), (lr * lr).sum()))
    out = []
    for p in torch.as_tensor(perms).split(chunk):
        yp = yw[p]                                  # (c, N, d_y): Y's samples shuffled by each pi
        m = torch.matmul(xw, yp).double()           # (c, d_x, d_y): one batched product
        out.append(hsic(m, ld[p] @ kd, lr[p] @ kr))
    return torch.cat(out).numpy() / np.sqrt(kk * ll)


def today_module(rev: str):
    """permutation.py as it was at ``rev``, imported inside intertwiners.similarity (its relative imports)."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "-C", str(root), "show", f"{rev}:src/intertwiners/similarity/permutation.py"],
                         check=True, capture_output=True, text=True).stdout
    src = src.replace("cache=True", "cache=False")     # numba cannot cache code that has no file
    name = "intertwiners.similarity._permutation_today"
    spec = importlib.util.spec_from_loader(name, loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "intertwiners.similarity"
    sys.modules[name] = mod
    exec(compile(src, f"{rev}:permutation.py", "exec"), mod.__dict__)
    return mod


def linear_cka(args, g) -> None:
    print(f"\n1. linear CKA, {args.permutations} permutations: permutation_test / batched-product baseline")
    print(f"{'N':>5} {'d':>4} {'baseline (s)':>13} {'test (s)':>9} {'ratio':>6} {'max |null diff|':>16}")
    sizes = [(1000, 64)] if args.quick else [(1000, 64), (1000, 256), (2000, 64), (2000, 256)]
    for n, d in sizes:
        x = torch.randn(n, d, generator=g)
        y = x @ torch.randn(d, d, generator=g) / d ** 0.5 + torch.randn(n, d, generator=g)
        perms = permutations(n, args.permutations, 0)
        base = best(lambda x=x, y=y, perms=perms: batched_product_null(x, y, perms), args.repeats)
        test = best(lambda x=x, y=y: sim.permutation_test(x, y, "linear_cka", args.permutations, generator=0),
            args.repeats)
        r = sim.permutation_test(x, y, "linear_cka", args.permutations, generator=0)
        diff = float(np.abs(r.null_distribution - batched_product_null(x, y, perms)).max())
        print(f"{n:>5} {d:>4} {base:13.3f} {test:9.3f} {test / base:5.2f}x {diff:16.1e}")


def grelu_cka(args, g) -> None:
    today = today_module(args.today)
    print(f"\n2. G_ReLU-CKA, {args.permutations} permutations: permutation_test now / at {args.today}")
    print(f"{'features':>14} {'at ' + args.today + ' (s)':>16} {'now (s)':>8} {'ratio':>6}")
    shapes = [(1000, 64)] if args.quick else [(1000, 64), (1000, 256), (1000, 16, 4, 4)]
    for shape in shapes:
        x = torch.relu(torch.randn(*shape, generator=g))
        y = torch.relu(x + torch.randn(*shape, generator=g))
        old = best(lambda x=x, y=y: today.permutation_test(x, y, "grelu_cka", args.permutations, generator=0),
            args.repeats)
        new = best(lambda x=x, y=y: sim.permutation_test(x, y, "grelu_cka", args.permutations, generator=0),
            args.repeats)
        print(f"{str(tuple(shape)):>14} {old:16.3f} {new:8.3f} {new / old:5.2f}x")


def procrustes(args, g) -> None:
    n, d, seeds = 500, 32, (3 if args.quick else 20)
    print(f"\n3. procrustes_orthogonal, N = {n}, d = {d}: sequential (h = 10, at most {args.permutations}) over "
          f"{seeds} data sets / fixed {args.permutations}")
    print(f"{'observed value':>15} {'mean permutations':>18} {'sequential (s)':>15} {'fixed (s)':>10} {'ratio':>6}")
    for label, signal in (("typical", 0.0), ("extreme", 1.0)):
        counts, seq_t, fix_t = [], [], []
        for s in range(seeds):
            x = torch.randn(n, d, generator=g)
            y = signal * x + torch.randn(n, d, generator=g)
            t = time.perf_counter()
            r = sim.permutation_test(x, y, "procrustes_orthogonal", args.permutations, generator=s, sequential=True)
            seq_t.append(time.perf_counter() - t)
            counts.append(r.n_permutations)
            t = time.perf_counter()
            sim.permutation_test(x, y, "procrustes_orthogonal", args.permutations, generator=s)
            fix_t.append(time.perf_counter() - t)
        a, b = float(np.mean(seq_t)), float(np.mean(fix_t))
        print(f"{label:>15} {np.mean(counts):18.1f} {a:15.4f} {b:10.4f} {a / b:5.2f}x")


def spatial_procrustes(args, g) -> None:
    from intertwiners.similarity.permutation import batched_products, pairwise_products, pairwise_route

    n, count = 400, 500
    print(f"\n4. X'Y_pi of Procrustes on spatial features, N = {n}, {count} permutations: chosen route / batched")
    print(f"{'layer':>14} {'route':>9} {'chosen (s)':>11} {'batched (s)':>12} {'ratio':>6}")
    perms = torch.as_tensor(permutations(n, count, 0))
    for c, side in ((16, 16), (32, 16), (64, 8), (128, 4))[:1 if args.quick else 4]:
        x = torch.randn(n, side * side, c, generator=g).relu()
        y = torch.randn(n, side * side, c, generator=g).relu()
        pairwise = pairwise_route(side * side, count, n)
        route = pairwise_products if pairwise else batched_products
        chosen = best(lambda route=route, x=x, y=y: route(x, y, perms), args.repeats)
        base = best(lambda x=x, y=y: batched_products(x, y, perms), args.repeats)
        print(f"{f'{c} x {side}x{side}':>14} {'pairwise' if pairwise else 'batched':>9} {chosen:11.3f} "
              f"{base:12.3f} {base / chosen:5.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--permutations", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--today", default="a9e531d", help="git revision of the G_ReLU-CKA baseline")
    ap.add_argument("--quick", action="store_true", help="one shape per part (a smoke run)")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 4, generator=g)
    sim.permutation_test(x0, x0, "grelu_cka", 2)   # compile the numba kernels before timing
    print(f"{args.permutations} permutations, best of {args.repeats}, torch threads: {torch.get_num_threads()}")
    linear_cka(args, g)
    grelu_cka(args, g)
    procrustes(args, g)
    spatial_procrustes(args, g)


if __name__ == "__main__":
    main()
