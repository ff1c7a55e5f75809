"""Benchmark: symmetry_spec + random_symmetry + apply_symmetry on a ResNet-50-sized network.

The network is built here from torch primitives (bottleneck blocks 3-4-6-3, widths 64..2048, ~25.6M
parameters, as torchvision's resnet50). Prints the time of each step and its ratio to one forward pass
of a batch of 8 (eval mode, no autograd) measured in the same run.

    python benchmarks/bench_symmetries.py [--size 224] [--batch 8] [--threads 0] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from intertwiners.symmetries import apply_symmetry, random_symmetry, symmetry_spec


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        return self.relu3(self.bn3(self.conv3(out)) + identity)


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000, blocks=(3, 4, 6, 3)):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        self.relu, self.maxpool = nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (n, planes) in enumerate(zip(blocks, (64, 128, 256, 512))):
            layers = []
            for b in range(n):
                layers.append(Bottleneck(cin, planes, 2 if (i > 0 and b == 0) else 1))
                cin = planes * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(2048, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224, help="input resolution (forward baseline and spec input)")
    p.add_argument("--batch", type=int, default=8, help="batch of the forward-pass baseline")
    p.add_argument("--spec-size", type=int, default=None,
                   help="resolution of the batch-1 example input given to symmetry_spec (default: --size); "
                        "the spec only needs shapes, so a small input gives the same spaces faster")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0: torch default; 1 is steadier on a shared machine)")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    p.add_argument("--check", action="store_true", help="also check the output (float64, eval, batch 2 at 64x64)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ResNet50().eval()
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.randn(args.batch, 3, args.size, args.size)
    spec_size = args.spec_size or args.size
    example = torch.randn(1, 3, spec_size, spec_size)
    print(f"ResNet-50 from torch primitives: {n_params / 1e6:.2f}M parameters; torch threads "
          f"{torch.get_num_threads()}; input {args.size}x{args.size}")

    with torch.no_grad():
        model(example)  # warm-up
        t_fwd, _ = timed(lambda: model(x), args.repeats)
    with torch.no_grad():
        t_fwd_example, _ = timed(lambda: model(example), args.repeats)
    # the first call in a process also imports torch's tracer (torch._dynamo, ~1-2 s, once per process)
    t_first, _ = timed(lambda: symmetry_spec(model, example, check=False), 1)
    t_derive, _ = timed(lambda: symmetry_spec(model, example, check=False), args.repeats)
    t_spec, spec = timed(lambda: symmetry_spec(model, example), args.repeats)
    g = torch.Generator().manual_seed(0)
    t_rand, elements = timed(lambda: random_symmetry(spec, g), args.repeats)
    t_rand_m, mono = timed(lambda: random_symmetry(spec, g, monomial=True), args.repeats)
    t_apply, _ = timed(lambda: apply_symmetry(model, elements, spec), args.repeats)
    t_apply_m, _ = timed(lambda: apply_symmetry(model, mono, spec), args.repeats)
    total = t_spec + t_rand + t_apply
    total_m = t_spec + t_rand_m + t_apply_m
    print(f"spaces: {len(spec.spaces)} ({sum(s.size for s in spec.spaces.values())} channels), "
          f"pinned: {len(spec.pinned)}; sites: {len(spec.sites)}")
    rows = [(f"forward, batch {args.batch} (baseline)", t_fwd),
            (f"symmetry_spec (one batch-1 {spec_size}x{spec_size} forward inside)", t_spec),
            ("random_symmetry (dense (n, n) tensors)", t_rand),
            ("apply_symmetry (dense elements)", t_apply),
            ("random_symmetry(monomial=True)", t_rand_m),
            ("apply_symmetry ((perm, scale) elements)", t_apply_m),
            ("TOTAL spec + random + apply (dense API)", total),
            ("TOTAL spec + random + apply (monomial)", total_m)]
    for name, t in rows:
        print(f"  {name:<48} {t:8.3f} s   {t / t_fwd:6.2f} x forward")
    print(f"goal: total under 5 s on CPU -> {'met' if total < 5 else 'NOT met'} ({total:.2f} s)")
    print(f"  {'forward of the spec input, batch 1 ' + str(spec_size) + 'x' + str(spec_size):<48} "
          f"{t_fwd_example:8.3f} s")
    print(f"  {'symmetry_spec(check=False), first call':<48} {t_first:8.3f} s   "
          f"{t_first / t_fwd_example:6.2f} x forward of the same input (imports torch's tracer once per process)")
    print(f"  {'symmetry_spec(check=False), later calls':<48} {t_derive:8.3f} s   "
          f"{t_derive / t_fwd_example:6.2f} x forward of the same input (issue 18 goal <= 5x: "
          f"{'met' if t_derive <= 5 * t_fwd_example else 'NOT met'})")
    if args.check:
        m64 = ResNet50().double().eval()
        xs = torch.randn(2, 3, 64, 64, dtype=torch.float64)
        s64 = symmetry_spec(m64, xs)
        new = apply_symmetry(m64, random_symmetry(s64, g, monomial=True), s64)
        with torch.no_grad():
            a, b = m64(xs), new(xs)
        print(f"check: max relative output error {float((a - b).abs().max() / a.abs().max()):.2e} (float64)")


if __name__ == "__main__":
    main()
