"""Intertwiner groups: cost of deriving a group numerically vs the Table 1 fast path, and phi in monomial
form vs dense matrices.

Baselines measured in the same run: the fast path ``intertwiner_group("relu")`` and a dense n×n matmul.
Run: ``.venv/bin/python benchmarks/bench_groups.py``.
"""

from __future__ import annotations

import time

import torch

from intertwiners.activations import make_activation
from intertwiners.groups import derive_group, intertwiner_group, monomial_matrix


def timeit(fn, repeat: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    torch.set_num_threads(1)
    fast = timeit(lambda: intertwiner_group("relu"), 50)
    print(f"fast path intertwiner_group('relu'): {fast * 1e6:8.1f} us (baseline)")
    for name in ("relu", "tanh", "gelu", "power:3"):
        module = make_activation(name)
        t = timeit(lambda module=module, name=name: derive_group(module, name), 10)
        print(f"derive_group({name!r:10}):             {t * 1e3:8.2f} ms  ratio {t / fast:8.0f}x")
    G = intertwiner_group("power:3")
    for n in (256, 2048):
        g = torch.Generator().manual_seed(0)
        perm, scale = G.sample_monomial(n, generator=g)
        A = monomial_matrix(perm, scale)
        x = torch.randn(n, n, dtype=torch.float64, generator=g)
        dense = timeit(lambda A=A, x=x: A @ x, 5)
        mono = timeit(lambda perm=perm, scale=scale: G.phi_monomial(perm, scale), 20)
        phi_dense = timeit(lambda A=A: G.phi(A), 5)
        print(f"n={n:5d}: dense matmul {dense * 1e3:8.2f} ms (baseline) | phi_monomial {mono * 1e3:7.3f} ms "
              f"({mono / dense:.4f}x) | phi(dense A) {phi_dense * 1e3:8.2f} ms ({phi_dense / dense:.2f}x)")


if __name__ == "__main__":
    main()
