"""CUDA smoke check for intertwiners.similarity: every measure on the GPU agrees with the CPU, plus timings.

    python benchmarks/gpu_check_similarity.py      (needs a CUDA device; prints and exits 0 when all agree)
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch


def main() -> int:
    from intertwiners import models
    from intertwiners import similarity as sim
    name = sys.argv[1] if len(sys.argv) > 1 else "cuda"     # "cpu" dry-runs the script itself
    if name == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    dev = torch.device(name)
    sync = torch.cuda.synchronize if name == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    X = torch.tensor(rng.standard_normal((300, 40)), dtype=torch.float32)
    Y = torch.tensor(np.maximum(rng.standard_normal((300, 40)), 0), dtype=torch.float32)
    C = torch.tensor(np.maximum(rng.standard_normal((200, 8, 4, 4)), 0), dtype=torch.float32)
    D = torch.tensor(np.maximum(rng.standard_normal((200, 8, 4, 4)), 0), dtype=torch.float32)
    ok = True

    def check(name, cpu, gpu, tol=1e-4):
        nonlocal ok
        cpu = cpu.cpu().numpy() if isinstance(cpu, torch.Tensor) else np.asarray(cpu)
        gpu = gpu.cpu().numpy() if isinstance(gpu, torch.Tensor) else np.asarray(gpu)
        err = float(np.max(np.abs(cpu - gpu)))
        good = err <= tol * max(1.0, float(np.max(np.abs(cpu))))
        ok &= good
        print(f"{'ok ' if good else 'BAD'} {name:<40} max|cpu-gpu| = {err:.2e}")

    Kg = sim.max_kernel(X.to(dev))
    assert Kg.device.type == name
    check("max_kernel (N, d)", sim.max_kernel(X), Kg)
    check("max_kernel (N, C, H, W)", sim.max_kernel(C, D), sim.max_kernel(C.to(dev), D.to(dev)))
    for kernel in ("linear", "rbf", "max"):
        check(f"cka {kernel}", sim.cka(X, Y, kernel), sim.cka(X, Y, kernel, device=name))
        check(f"cka {kernel} conv", sim.cka(C, D, kernel), sim.cka(C.to(dev), D.to(dev), kernel))
    check("grelu_cka conv biased", sim.grelu_cka(C, D, "biased"), sim.grelu_cka(C, D, "biased", device=name))
    for g in ("orthogonal", "permutation", "grelu"):
        check(f"procrustes {g} conv", sim.procrustes(C, D, g), sim.procrustes(C.to(dev), D.to(dev), g))
    m_cpu, m_gpu = sim.MinibatchCKA("max"), sim.MinibatchCKA("max", device=name)
    for i in range(0, 300, 100):
        m_cpu.update(X[i:i + 100], Y[i:i + 100])
        m_gpu.update(X[i:i + 100], Y[i:i + 100])
    check("MinibatchCKA max", m_cpu.compute(), m_gpu.compute())
    torch.manual_seed(0)
    a = models.myrtle_cnn(width=8, in_channels=1, input_size=16)
    b = models.myrtle_cnn(width=8, in_channels=1, input_size=16)
    x = torch.randn(128, 1, 16, 16)
    for measure in ("cka", "grelu_cka"):
        check(f"layer matrix {measure}", sim.layer_similarity_matrix(a, b, x, measure=measure, batch_size=64,
                                                                    device="cpu"),
              sim.layer_similarity_matrix(a, b, x, measure=measure, batch_size=64, device=name), 1e-3)
    t_cpu = sim.procrustes_per_layer(a, b, x, device="cpu")
    t_gpu = sim.procrustes_per_layer(a, b, x, device=name)
    check("procrustes_per_layer", [list(v.values()) for v in t_cpu.values()],
          [list(v.values()) for v in t_gpu.values()], 1e-3)
    assert next(a.parameters()).device.type == "cpu", "models must be moved back"

    def gtime(f, reps=5):
        f()
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            f()
        sync()
        return (time.perf_counter() - t) / reps

    Xg = torch.randn(4096, 512, device=dev)
    gm = gtime(lambda: Xg @ Xg.T)
    mk = gtime(lambda: sim.max_kernel(Xg))
    print(f"GPU max_kernel 4096x512: {mk * 1e3:.2f} ms vs X @ X.T {gm * 1e3:.3f} ms ({mk / gm:.1f}x)")
    Cg = torch.relu(torch.randn(1024, 64, 8, 8, device=dev))
    Dg = torch.relu(torch.randn(1024, 64, 8, 8, device=dev))
    Fc, Fd = Cg.reshape(1024, -1), Dg.reshape(1024, -1)
    base = gtime(lambda: (Fc @ Fc.T, Fd @ Fd.T))
    gc = gtime(lambda: sim.grelu_cka(Cg, Dg))
    print(f"GPU grelu_cka (1024, 64, 8, 8): {gc * 1e3:.2f} ms vs 2 matmuls {base * 1e3:.3f} ms ({gc / base:.1f}x)")
    print("ALL OK" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
