"""Small stand-ins for the three models of Fig. 3, sized for 24x24 to 32x32 RGB images on a CPU.

* ``resnet``: a ResNet with basic blocks whose residual output goes through a ReLU (as ResNet-50);
* ``resnet_noact``: the same without the activation on the residual output (the paper's modified
  ResNet-50): block output = bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x);
* ``convnext``: ConvNeXt-style blocks: depthwise conv, normalisation, pointwise MLP (4x, GELU), layer
  scale, residual add with no activation (see :class:`SmallConvNeXt` for why batch norm and 5x5 kernels).

The probed layer in Fig. 3 is the output of the last block (``"stage3.1"`` for every model here, at
1/4 of the input resolution), plus, for contrast, the ReLU inside that block (``"stage3.1.relu1"``) of
the ResNets. ``save``/``load`` use safetensors + config.json (no pickle), like :mod:`intertwiners.models`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class ResidualBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, then ReLU (``residual_activation``) or nothing."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, residual_activation: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))
        self.relu2: nn.Module = nn.ReLU() if residual_activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem conv3x3 + BN + ReLU, three stages of ``blocks`` residual blocks (strides 1, 2, 2), average
    pool, linear head. Block outputs: ``stage{s}.{b}``."""

    def __init__(self, num_classes: int = 4, widths=(16, 32, 64), blocks: int = 2,
                 residual_activation: bool = True, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        in_planes = widths[0]
        for s, planes in enumerate(widths, start=1):
            layers = []
            for b in range(blocks):
                layers.append(ResidualBlock(in_planes, planes, 2 if (s > 1 and b == 0) else 1,
                                            residual_activation))
                in_planes = planes
            setattr(self, f"stage{s}", nn.Sequential(*layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of (N, C, H, W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def channel_norm(kind: str, channels: int) -> nn.Module:
    """``"batch"``: BatchNorm2d; ``"layer"``: LayerNorm over channels (:class:`ChannelLayerNorm`)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return ChannelLayerNorm(channels)
    raise ValueError(f"norm must be 'batch' or 'layer', got {kind!r}")


class ConvNeXtBlock(nn.Module):
    """x + gamma * pw2(GELU(pw1(norm(dwconv(x))))); no activation after the residual add."""

    def __init__(self, dim: int, expansion: int = 4, layer_scale: float = 1.0, kernel: int = 5,
                 norm: str = "batch"):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = channel_norm(norm, dim)
        self.pwconv1 = nn.Conv2d(dim, expansion * dim, 1)
        self.act = nn.GELU()
        self.pwconv2 = nn.Conv2d(expansion * dim, dim, 1)
        self.gamma = nn.Parameter(torch.full((dim, 1, 1), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))


class SmallConvNeXt(nn.Module):
    """Stem conv3x3 + norm, three stages of ConvNeXt blocks with norm + 2x2 stride-2 conv downsampling
    between them, average pool, LayerNorm, linear head. Block outputs: ``stage{s}.{b}``.

    ``norm="batch"`` (default) uses batch norm where ConvNeXt has LayerNorm, and the blocks use 5x5
    depthwise convolutions and a layer scale starting at 1: with LayerNorm, 7x7 kernels and layer scale
    0.1 (``norm="layer", kernel=7, layer_scale=0.1``, the original recipe) the stand-in fitted the
    training images of the synthetic dataset but generalised poorly (35% probe accuracy, 4 classes) and
    had no interpretable units at its residual output, so the Fig. 3 claim had nothing to test. Either
    way there is no activation on the residual output, which is what Fig. 3 is about.
    """

    def __init__(self, num_classes: int = 4, widths=(16, 32, 64), blocks: int = 2, in_channels: int = 3,
                 norm: str = "batch", kernel: int = 5, layer_scale: float = 1.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1), channel_norm(norm, widths[0]))
        for s, dim in enumerate(widths, start=1):
            if s > 1:
                setattr(self, f"down{s}", nn.Sequential(channel_norm(norm, widths[s - 2]),
                                                         nn.Conv2d(widths[s - 2], dim, 2, stride=2)))
            setattr(self, f"stage{s}", nn.Sequential(*[ConvNeXtBlock(dim, layer_scale=layer_scale, kernel=kernel,
                                                                     norm=norm) for _ in range(blocks)]))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_norm = nn.LayerNorm(widths[-1])
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(self.stem(x))
        x = self.stage2(self.down2(x))
        x = self.stage3(self.down3(x))
        return self.fc(self.head_norm(self.pool(x).flatten(1)))


FIG3_ARCHITECTURES = ("resnet", "resnet_noact", "convnext")


def build_fig3_model(arch: str, num_classes: int = 4, widths=(16, 32, 64), blocks: int = 2,
                     in_channels: int = 3) -> nn.Module:
    """One of :data:`FIG3_ARCHITECTURES`; the config is kept in ``model.intertwiners_config``."""
    if arch == "resnet":
        model: nn.Module = SmallResNet(num_classes, widths, blocks, True, in_channels)
    elif arch == "resnet_noact":
        model = SmallResNet(num_classes, widths, blocks, False, in_channels)
    elif arch == "convnext":
        model = SmallConvNeXt(num_classes, widths, blocks, in_channels)
    else:
        raise ValueError(f"unknown Fig. 3 architecture {arch!r}; known: {FIG3_ARCHITECTURES}")
    model.intertwiners_config = {"arch": f"fig3_{arch}", "kwargs": dict(
        num_classes=num_classes, widths=list(widths), blocks=blocks, in_channels=in_channels)}
    return model


def save(model: nn.Module, folder: str | Path) -> Path:
    """``folder/model.safetensors`` + ``folder/config.json``."""
    config = getattr(model, "intertwiners_config", None)
    if config is None or not str(config.get("arch", "")).startswith("fig3_"):
        raise ValueError("save: not a model built by build_fig3_model")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def load_any(path: str | Path) -> nn.Module:
    """Load a model saved by :func:`save` or by :func:`intertwiners.models.save` (folder or .safetensors)."""
    from .. import models

    weights, config = models.read_config(path)
    arch = str(config.get("arch", ""))
    if not arch.startswith("fig3_"):
        return models.load(path)
    model = build_fig3_model(arch[len("fig3_"):], **config.get("kwargs", {}))
    model.load_state_dict(load_file(str(weights)))
    return model.eval()
