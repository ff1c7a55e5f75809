"""Benchmark: peak memory of ``intertwiners align A B`` (weight matching) on two Hugging Face model folders.

Two GPT-2-style models with random weights (``GPT2LMHeadModel``, 12 layers by default: GPT-2 small, 124M
parameters, 475 MiB of float32) are saved with ``save_pretrained`` into a temporary folder; then, each in a
fresh process,

1. the baseline: the interpreter with torch, transformers, GPT-2's model class and the CLI imported;
2. ``intertwiners align A B --out OUT`` run in that process (``intertwiners.cli.main``).

Each process reports its peak resident set (``VmHWM`` of ``/proc/self/status``: anonymous and file-backed
pages, so memory-mapped safetensors files count too). The figure is the CLI's peak above the baseline's, as
a multiple of one model's parameter bytes (goal of issue 20: at most 3). The temporary folder is removed
afterwards. The ``intertwiners`` imported is the one first on ``PYTHONPATH`` (run it once with main's
``src`` and once with a branch's to compare them).

    PYTHONPATH=src python benchmarks/bench_align_memory.py [--layers 12] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMPORTS = ("import torch, transformers\n"
           "from transformers import GPT2LMHeadModel\n"
           "import intertwiners.cli\n"
           "import intertwiners.alignment\n")

REPORT = ("def _hwm():\n"
          "    for line in open('/proc/self/status'):\n"
          "        if line.startswith('VmHWM:'):\n"
          "            return int(line.split()[1]) / 1024\n")


def child(code: str) -> tuple[float, str]:
    """Run ``code`` in a fresh interpreter; (its VmHWM in MiB, its output)."""
    script = IMPORTS + REPORT + code + "\nprint('VMHWM', _hwm())\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise SystemExit(f"child failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    lines = done.stdout.strip().splitlines()
    peak = float(next(line.split()[1] for line in reversed(lines) if line.startswith("VMHWM")))
    return peak, "\n".join(line for line in lines if not line.startswith("VMHWM"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12, help="GPT-2 layers (12: GPT-2 small)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in the CLI's process")
    args = p.parse_args(argv)

    import torch
    import transformers as tf

    import intertwiners

    tmp = Path(tempfile.mkdtemp(prefix="bench_align_memory_"))
    try:
        cfg = tf.GPT2Config(n_layer=args.layers, use_cache=False)
        torch.manual_seed(0)
        one = 0
        for name in ("a", "b"):
            model = tf.GPT2LMHeadModel(cfg).eval()
            one = sum(q.numel() * q.element_size() for q in model.parameters()) / 2**20
            model.save_pretrained(tmp / name, safe_serialization=True)
            del model
        print(f"intertwiners from {Path(intertwiners.__file__).parent}; GPT-2 with {args.layers} layers: "
              f"{one:.1f} MiB of float32 parameters per model ({one * 2**20 / 4 / 1e6:.1f}M parameters)", flush=True)
        base, _ = child("")
        t = time.perf_counter()
        peak, out = child(f"torch.set_num_threads({args.threads})\n"
                          f"rc = intertwiners.cli.main(['align', {str(tmp / 'a')!r}, {str(tmp / 'b')!r}, "
                          f"'--out', {str(tmp / 'out')!r}, '--device', 'cpu'])\n"
                          "assert rc == 0, rc\n")
        seconds = time.perf_counter() - t
        print(out)
        above = peak - base
        print(f"baseline process (imports only): peak {base:.0f} MiB; `intertwiners align A B`: peak {peak:.0f} MiB "
              f"in {seconds:.1f} s; above the baseline: {above:.0f} MiB = {above / one:.2f} x one model "
              f"(goal <= 3 x: {'met' if above <= 3 * one else 'NOT met'})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
