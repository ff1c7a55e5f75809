"""Benchmarks for intertwiners.similarity: times and ratios against baselines measured in the same run.

    .venv/bin/python benchmarks/bench_similarity.py [--quick]

Targets (issue 4), on 2 CPU cores:
  1. max_kernel on N=4096, d=512 float32           <= 2.5x  X @ X.T of the same shape
  2. grelu_cka on (1024, 64, 8, 8) features       <= 4x    the matmuls doing the same work (the two
                                                           Gram matrices of the flattened features)
  3. G_ReLU-Procrustes on (100,000 x 512)         <= 2x    orthogonal Procrustes on the same data
  4. streaming (minibatch) CKA, 50,000 x 512      peak memory independent of N (VmHWM of a fresh process)
Each line prints the best-of-k wall time and CPU time (process_time; less sensitive to other processes
on a shared machine) of both sides and their ratios.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch


def timed(fn, reps: int):
    """Best wall time and best CPU time over ``reps`` runs (after one warm-up)."""
    fn()
    walls, cpus = [], []
    for _ in range(reps):
        w, c = time.perf_counter(), time.process_time()
        fn()
        cpus.append(time.process_time() - c)
        walls.append(time.perf_counter() - w)
    return min(walls), min(cpus)


def report(name, t, base, base_name, target=None):
    rw, rc = t[0] / base[0], t[1] / base[1]
    tgt = "" if target is None else f"  (target <= {target}x: {'MET' if min(rw, rc) <= target else 'NOT MET'})"
    print(f"{name:<44} wall {t[0]:8.4f}s cpu {t[1]:8.4f}s | {base_name:<26} wall {base[0]:8.4f}s "
          f"cpu {base[1]:8.4f}s | ratio wall {rw:5.2f}x cpu {rc:5.2f}x{tgt}", flush=True)


def bench_max_kernel(reps):
    from intertwiners.similarity import max_kernel
    from intertwiners.similarity.max_kernel import max_product_torch
    rng = np.random.default_rng(0)
    X = rng.standard_normal((4096, 512)).astype(np.float32)
    Y = rng.standard_normal((4096, 512)).astype(np.float32)
    Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)
    gemm = timed(lambda: Xt @ Xt.T, reps)
    report("max_kernel(X)        4096x512 f32 (numba)", timed(lambda: max_kernel(X), reps), gemm, "torch X @ X.T", 2.5)
    report("max_kernel(X, Y)     4096x512 f32 (numba)", timed(lambda: max_kernel(X, Y), reps),
           timed(lambda: Xt @ Yt.T, reps), "torch X @ Y.T", 2.5)
    report("  numpy baseline", timed(lambda: max_kernel(X), reps), timed(lambda: X @ X.T, reps), "numpy X @ X.T")
    Xs = Xt[:1024]
    report("naive broadcast max  1024x512 f32 (torch)", timed(lambda: max_product_torch(Xs), 1),
           timed(lambda: Xs @ Xs.T, reps), "torch X @ X.T (1024)")


def bench_grelu_cka(reps):
    from intertwiners.similarity import cka, grelu_cka
    rng = np.random.default_rng(1)
    X = torch.from_numpy(np.maximum(rng.standard_normal((1024, 64, 8, 8)), 0).astype(np.float32))
    Y = torch.from_numpy(np.maximum(rng.standard_normal((1024, 64, 8, 8)), 0).astype(np.float32))
    Xf, Yf = X.reshape(1024, -1), Y.reshape(1024, -1)
    base = timed(lambda: (Xf @ Xf.T, Yf @ Yf.T), reps)
    report("grelu_cka (1024, 64, 8, 8) f32", timed(lambda: grelu_cka(X, Y), reps), base,
           "2 matmuls (1024x4096)x(4096x1024)", 4)
    report("  linear cka, same features", timed(lambda: cka(X, Y), reps), base, "2 matmuls")


def bench_procrustes(reps):
    from intertwiners.similarity import procrustes
    rng = np.random.default_rng(2)
    X = torch.from_numpy(np.maximum(rng.standard_normal((100_000, 512), dtype=np.float32), 0))
    Y = torch.from_numpy(np.maximum(rng.standard_normal((100_000, 512), dtype=np.float32), 0))
    base = timed(lambda: procrustes(X, Y, "orthogonal"), reps)
    report("G_ReLU-Procrustes 100000x512 f32", timed(lambda: procrustes(X, Y, "grelu"), reps), base,
           "orthogonal Procrustes", 2)
    report("  permutation Procrustes", timed(lambda: procrustes(X, Y, "permutation"), reps), base,
           "orthogonal Procrustes")


_STREAM_CHILD = r"""
import sys, time, numpy as np, torch
from intertwiners.similarity import MinibatchCKA
n, d, b = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
W = rng.standard_normal((d, d)).astype(np.float32) / np.sqrt(d)
m = MinibatchCKA(kernel="linear")
t = time.perf_counter()
for i in range(0, n, b):
    xb = rng.standard_normal((min(b, n - i), d), dtype=np.float32)
    m.update(xb, np.tanh(xb @ W))
# VmHWM: this process's peak resident set (ru_maxrss would also count the parent's peak before exec)
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(m.compute(), time.perf_counter() - t, hwm)
"""


def bench_streaming(sizes=(5_000, 50_000), d=512, batch=500):
    print(f"streaming linear CKA, d={d}, batch={batch}: peak resident memory (VmHWM) of a fresh process per N")
    peaks = []
    for n in sizes:
        out = subprocess.run([sys.executable, "-c", _STREAM_CHILD, str(n), str(d), str(batch)],
                             capture_output=True, text=True, check=True).stdout.split()
        value, secs, rss_kib = float(out[0]), float(out[1]), int(out[2])
        peaks.append(rss_kib)
        full = 2 * n * d * 4 / 2**20
        print(f"  N={n:>6}: CKA {value:.4f} in {secs:6.2f}s, peak RSS {rss_kib / 1024:7.1f} MiB "
              f"(holding X and Y alone would take {full:6.1f} MiB; an exact N x N Gram "
              f"{n * n * 8 / 2**30:5.2f} GiB)", flush=True)
    print(f"  peak growth from N={sizes[0]} to N={sizes[-1]}: {(peaks[-1] - peaks[0]) / 1024:+.1f} MiB")
    # the exact (full-data) linear CKA on the same samples, through the feature-space route (no N x N)
    from intertwiners.similarity import cka
    n = sizes[-1]
    rng = np.random.default_rng(0)
    W = rng.standard_normal((d, d)).astype(np.float32) / np.sqrt(d)
    X = np.concatenate([rng.standard_normal((min(batch, n - i), d), dtype=np.float32) for i in range(0, n, batch)])
    Y = np.tanh(X @ W)
    t = time.perf_counter()
    exact = cka(X, Y)
    print(f"  exact linear CKA on all N={n} (feature route, no N x N matrix): {exact:.4f} in "
          f"{time.perf_counter() - t:.2f}s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only", default="max_kernel,grelu_cka,procrustes,streaming")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    import numba
    print(f"torch threads {torch.get_num_threads()}, numba threads {numba.get_num_threads()}, "
          f"load average {os.getloadavg()}, cpus {os.cpu_count()}")
    only = set(args.only.split(","))
    if "max_kernel" in only:
        bench_max_kernel(args.reps)
    if "grelu_cka" in only:
        bench_grelu_cka(args.reps)
    if "procrustes" in only:
        bench_procrustes(args.reps)
    if "streaming" in only:
        bench_streaming()
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; "
          f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
