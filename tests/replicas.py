"""Small but faithful replicas of the model families people use (torchvision, timm, Hugging Face).

An importable helper module (no tests here): the symmetry tests, ``tests/test_replicas.py`` and
``benchmarks/bench_symmetry_coverage.py`` use it. Each builder returns ``(model, example_input)``: channel
widths at most 32, 16x16 images (batch 2) or 16 token ids (batch 2), 10 classes. The blocks are written the
way torchvision / timm write them (in-place activations, ``Conv2dNormActivation``-style ``Sequential``s, one
ReLU module called twice, ``out += identity``, ``permute`` to channels-last, ``reshape``/``permute`` into
heads, ``nn.MultiheadAttention``, ``F.scaled_dot_product_attention``) — torchvision and timm themselves
cannot be imported here.

Weights are drawn under ``seed`` (the global random state is restored). Unlike the libraries' own
initialisation, every normalisation layer gets random affine parameters and batch norms random running
statistics, and layer scales start at 0.5, so that a wrongly transformed gamma, beta or statistic changes
the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 10
BATCH = 2
SIDE = 16
TOKENS = 16


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def randomize_norms(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Random affine parameters for every BatchNorm/LayerNorm/GroupNorm; random BN running statistics."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.LayerNorm | nn.GroupNorm):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=generator))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=generator))
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=generator))
                m.running_var.copy_(torch.exp(0.3 * torch.randn(m.running_var.shape, generator=generator)))
    return model


def _build(factory, seed: int, dtype: torch.dtype, example_shape=(BATCH, 3, SIDE, SIDE)):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
    g = torch.Generator().manual_seed(seed + 1)
    randomize_norms(model, g)
    model = model.to(dtype).eval()
    x = torch.randn(*example_shape, generator=g, dtype=torch.float64).to(dtype)
    return model, x


def conv_bn_act(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU6):
    """torchvision's Conv2dNormActivation: Sequential(conv without bias, BN, activation(inplace=True))."""
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth ("row" mode); identity in eval mode or when p = 0 (as here)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: avgpool -> conv1x1 -> activation -> conv1x1 -> scale_activation -> mul."""

    def __init__(self, channels, squeeze, activation=nn.ReLU, scale_activation=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def _scale(self, x):
        scale = self.avgpool(x)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, x):
        scale = self._scale(x)
        return scale * x


# --------------------------------------------------------------------------------------------------
# MobileNetV2 (torchvision): inverted residual, ReLU6(inplace=True), depthwise conv
# --------------------------------------------------------------------------------------------------

class InvertedResidualV2(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        layers = []
        if expand_ratio != 1:
            layers.append(conv_bn_act(inp, hidden, 1))
        layers += [conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_bn_act(3, 8, 3, 2), InvertedResidualV2(8, 8, 1, 1),
                                      InvertedResidualV2(8, 8, 1, 4), InvertedResidualV2(8, 16, 2, 2),
                                      InvertedResidualV2(16, 16, 1, 2), conv_bn_act(16, 32, 1))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, NUM_CLASSES))

    def forward(self, x):
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v2(seed=0, dtype=torch.float32):
    return _build(MobileNetV2, seed, dtype)


# --------------------------------------------------------------------------------------------------
# MobileNetV3 (torchvision): Hardswish(inplace=True), SE with ReLU and Hardsigmoid
# --------------------------------------------------------------------------------------------------

class InvertedResidualV3(nn.Module):
    def __init__(self, cin, k, expanded, cout, use_se, use_hs, stride):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        act = nn.Hardswish if use_hs else nn.ReLU
        layers = []
        if expanded != cin:
            layers.append(conv_bn_act(cin, expanded, 1, act=act))
        layers.append(conv_bn_act(expanded, expanded, k, stride, groups=expanded, act=act))
        if use_se:
            squeeze = max(8, (expanded // 4 + 4) // 8 * 8)  # torchvision's _make_divisible(expanded // 4, 8)
            layers.append(SqueezeExcitation(expanded, squeeze, scale_activation=nn.Hardsigmoid))
        layers.append(conv_bn_act(expanded, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        result = self.block(x)
        if self.use_res_connect:
            result += x
        return result


class MobileNetV3(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_act(3, 8, 3, 2, act=nn.Hardswish),
            InvertedResidualV3(8, 3, 8, 8, True, False, 2),     # SE, ReLU, depthwise without expansion
            InvertedResidualV3(8, 3, 16, 8, False, False, 1),   # residual
            InvertedResidualV3(8, 5, 24, 16, True, True, 1),    # SE, Hardswish
            InvertedResidualV3(16, 3, 32, 16, True, True, 1),   # SE, Hardswish, residual
            conv_bn_act(16, 32, 1, act=nn.Hardswish))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(32, 32), nn.Hardswish(inplace=True), nn.Dropout(0.2, inplace=True),
                                        nn.Linear(32, NUM_CLASSES))

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v3(seed=0, dtype=torch.float32):
    return _build(MobileNetV3, seed, dtype)


# --------------------------------------------------------------------------------------------------
# EfficientNet (torchvision): MBConv with SiLU, SE with SiLU and sigmoid, stochastic depth
# --------------------------------------------------------------------------------------------------

class MBConv(nn.Module):
    def __init__(self, cin, cout, expand_ratio, k, stride, sd_prob=0.0):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        expanded = cin * expand_ratio
        layers = []
        if expanded != cin:
            layers.append(conv_bn_act(cin, expanded, 1, act=nn.SiLU))
        layers.append(conv_bn_act(expanded, expanded, k, stride, groups=expanded, act=nn.SiLU))
        layers.append(SqueezeExcitation(expanded, max(1, cin // 4), activation=nn.SiLU))
        layers.append(conv_bn_act(expanded, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(sd_prob)

    def forward(self, x):
        result = self.block(x)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += x
        return result


class EfficientNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_bn_act(3, 8, 3, 2, act=nn.SiLU), MBConv(8, 8, 1, 3, 1),
                                      MBConv(8, 16, 2, 3, 2), MBConv(16, 16, 2, 5, 1),
                                      conv_bn_act(16, 32, 1, act=nn.SiLU))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=0.2, inplace=True), nn.Linear(32, NUM_CLASSES))

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def efficientnet(seed=0, dtype=torch.float32):
    return _build(EfficientNet, seed, dtype)


# --------------------------------------------------------------------------------------------------
# ConvNeXt (torchvision): depthwise 7x7, channels-last LayerNorm, Linear-GELU-Linear, layer scale
# --------------------------------------------------------------------------------------------------

class Permute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


class LayerNorm2d(nn.LayerNorm):
    """torchvision's LayerNorm2d: LayerNorm over channels of an NCHW tensor."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    def __init__(self, dim, layer_scale=0.5, sd_prob=0.0):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(dim, dim, 7, padding=3, groups=dim, bias=True), Permute([0, 2, 3, 1]),
                                   nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.GELU(),
                                   nn.Linear(4 * dim, dim), Permute([0, 3, 1, 2]))
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(sd_prob)

    def forward(self, x):
        result = self.layer_scale * self.block(x)
        result = self.stochastic_depth(result)
        result += x
        return result


class ConvNeXt(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, dim, 4, 4), LayerNorm2d(dim, eps=1e-6)),
            nn.Sequential(CNBlock(dim), CNBlock(dim)),
            nn.Sequential(LayerNorm2d(dim, eps=1e-6), nn.Conv2d(dim, dim, 2, 2)),
            nn.Sequential(CNBlock(dim)))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(dim, eps=1e-6), nn.Flatten(1), nn.Linear(dim, NUM_CLASSES))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


def convnext(seed=0, dtype=torch.float32, width=8):
    return _build(lambda: ConvNeXt(width), seed, dtype)


# --------------------------------------------------------------------------------------------------
# RegNet X (torchvision): ResBottleneckBlock with a grouped 3x3 convolution
# --------------------------------------------------------------------------------------------------

class BottleneckTransform(nn.Sequential):
    def __init__(self, w_in, w_out, stride, group_width, bottleneck_multiplier=1.0):
        w_b = int(round(w_out * bottleneck_multiplier))
        groups = w_b // group_width
        super().__init__()
        self.a = conv_bn_act(w_in, w_b, 1, act=nn.ReLU)
        self.b = conv_bn_act(w_b, w_b, 3, stride, groups=groups, act=nn.ReLU)
        self.c = conv_bn_act(w_b, w_out, 1, act=None)


class ResBottleneckBlock(nn.Module):
    def __init__(self, w_in, w_out, stride, group_width):
        super().__init__()
        self.proj = None
        if w_in != w_out or stride != 1:
            self.proj = conv_bn_act(w_in, w_out, 1, stride, act=None)
        self.f = BottleneckTransform(w_in, w_out, stride, group_width)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        if self.proj is not None:
            x = self.proj(x) + self.f(x)
        else:
            x = x + self.f(x)
        return self.activation(x)


class RegNetX(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn_act(3, 8, 3, 2, act=nn.ReLU)
        self.trunk_output = nn.Sequential(
            nn.Sequential(ResBottleneckBlock(8, 16, 2, 8)),                                  # 2 groups of 8
            nn.Sequential(ResBottleneckBlock(16, 24, 1, 4), ResBottleneckBlock(24, 24, 1, 4)))  # 6 groups of 4
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(24, NUM_CLASSES)

    def forward(self, x):
        x = self.trunk_output(self.stem(x))
        x = self.avgpool(x)
        x = x.flatten(start_dim=1)
        return self.fc(x)


def regnet_x(seed=0, dtype=torch.float32):
    return _build(RegNetX, seed, dtype)


# --------------------------------------------------------------------------------------------------
# DenseNet (torchvision): concatenation, BN-ReLU-conv layers, transition with average pooling
# --------------------------------------------------------------------------------------------------

class DenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, features):
        concated = torch.cat(features, 1)
        bottleneck = self.conv1(self.relu1(self.norm1(concated)))
        return self.conv2(self.relu2(self.norm2(bottleneck)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers, cin, bn_size, growth):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(cin + i * growth, growth, bn_size))

    def forward(self, init_features):
        features = [init_features]
        for _, layer in self.items():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)


class DenseNet(nn.Module):
    def __init__(self, growth=4, bn_size=2):
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, 8, 3, 1, 1, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(8))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(3, 2, 1))
        self.features.add_module("denseblock1", DenseBlock(2, 8, bn_size, growth))
        self.features.add_module("transition1", Transition(16, 8))
        self.features.add_module("denseblock2", DenseBlock(2, 8, bn_size, growth))
        self.features.add_module("norm5", nn.BatchNorm2d(16))
        self.classifier = nn.Linear(16, NUM_CLASSES)

    def forward(self, x):
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


def densenet(seed=0, dtype=torch.float32):
    return _build(DenseNet, seed, dtype)


# --------------------------------------------------------------------------------------------------
# ResNet-18 style (torchvision BasicBlock: one ReLU module called twice, out += identity)
# --------------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class _TorchvisionResNet(nn.Module):
    """torchvision's ResNet stem (7x7 conv stride 2, BN, ReLU, 3x3 max pool), then ``layer1..layer4`` (built by the
    subclass), global average pool, flatten, ``fc``."""

    def _stem(self, width):
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)

    def _head(self, cin):
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, NUM_CLASSES)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


class ResNet18(_TorchvisionResNet):
    def __init__(self, widths=(8, 16, 32, 32)):
        super().__init__()
        self._stem(widths[0])
        cin = widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w)))
            cin = w
        self._head(cin)


def resnet18(seed=0, dtype=torch.float32):
    return _build(ResNet18, seed, dtype)


# ResNet-50 style (torchvision Bottleneck: 1x1 -> 3x3 (stride) -> 1x1 x4, one ReLU module called three times,
# downsample = Sequential(conv 1x1 with the stride, BN) on the first block of every stage, out += identity)
# --------------------------------------------------------------------------------------------------

class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * self.expansion, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes * self.expansion))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet50(_TorchvisionResNet):
    """torchvision's resnet50 layout (stages of 3, 4, 6, 3 Bottleneck blocks) with ``planes`` per stage
    (torchvision: 64, 128, 256, 512)."""

    def __init__(self, planes=(4, 8, 16, 32), blocks=(3, 4, 6, 3)):
        super().__init__()
        self._stem(planes[0])
        cin = planes[0]
        for i, (p, n) in enumerate(zip(planes, blocks)):
            layers = [Bottleneck(cin, p, 1 if i == 0 else 2)]
            cin = p * Bottleneck.expansion
            layers += [Bottleneck(cin, p) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self._head(cin)


def resnet50(seed=0, dtype=torch.float32):
    return _build(ResNet50, seed, dtype)


# --------------------------------------------------------------------------------------------------
# ViT, timm style: patch embedding, cls token, qkv Linear reshaped into heads, layer scale
# --------------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    def __init__(self, img_size=SIDE, patch=4, cin=3, dim=16):
        super().__init__()
        self.num_patches = (img_size // patch) ** 2
        self.proj = nn.Conv2d(cin, dim, patch, patch)
        self.norm = nn.Identity()

    def forward(self, x):
        x = self.proj(x)
        x = x.flatten(2).transpose(1, 2)  # NCHW -> NLC
        return self.norm(x)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, fused=True, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = fused
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        return self.proj_drop(x)


class LayerScale(nn.Module):
    def __init__(self, dim, init_values=0.5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):
    """timm's Mlp: fc1 -> act -> drop -> norm -> fc2 -> drop (acts on the last axis)."""

    def __init__(self, cin, hidden, act_layer=nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(cin, hidden)
        self.act = act_layer()
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden, cin)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=2.0, init_values=None, fused=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, fused=fused)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = nn.Identity()

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class VisionTransformer(nn.Module):
    def __init__(self, dim=16, depth=2, num_heads=2, init_values=None, fused=True):
        super().__init__()
        self.patch_embed = PatchEmbed(dim=dim)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, self.patch_embed.num_patches + 1, dim))
        self.pos_drop = nn.Dropout(0.0)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, init_values=init_values, fused=fused)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        x = self.blocks(x)
        x = self.norm(x)
        return self.head(x[:, 0])


def vit_timm(seed=0, dtype=torch.float32, fused=True, layer_scale=True):
    """timm-style ViT (fused: F.scaled_dot_product_attention; else an explicit softmax(q kᵀ) v)."""
    return _build(lambda: VisionTransformer(init_values=0.5 if layer_scale else None, fused=fused), seed, dtype)


def vit_timm_softmax(seed=0, dtype=torch.float32):
    return vit_timm(seed, dtype, fused=False, layer_scale=False)


# --------------------------------------------------------------------------------------------------
# ViT, torchvision style: nn.MultiheadAttention
# --------------------------------------------------------------------------------------------------

class MLPBlock(nn.Sequential):
    def __init__(self, dim, mlp_dim):
        super().__init__(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp_dim, dim), nn.Dropout(0.0))


class EncoderBlock(nn.Module):
    def __init__(self, num_heads, dim, mlp_dim):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, num_heads, dropout=0.0, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, mlp_dim)

    def forward(self, input):
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x)
        x = x + input
        y = self.ln_2(x)
        y = self.mlp(y)
        return x + y


class Encoder(nn.Module):
    def __init__(self, seq_length, num_layers, num_heads, dim, mlp_dim):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, dim).normal_(std=0.02))
        self.dropout = nn.Dropout(0.0)
        self.layers = nn.Sequential(*[EncoderBlock(num_heads, dim, mlp_dim) for _ in range(num_layers)])
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, input):
        input = input + self.pos_embedding
        return self.ln(self.layers(self.dropout(input)))


class TorchvisionViT(nn.Module):
    def __init__(self, image_size=SIDE, patch_size=4, num_layers=2, num_heads=2, dim=16, mlp_dim=32):
        super().__init__()
        self.patch_size, self.hidden_dim = patch_size, dim
        self.conv_proj = nn.Conv2d(3, dim, patch_size, patch_size)
        seq_length = (image_size // patch_size) ** 2 + 1
        self.class_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.encoder = Encoder(seq_length, num_layers, num_heads, dim, mlp_dim)
        self.heads = nn.Sequential(nn.Linear(dim, NUM_CLASSES))

    def _process_input(self, x):
        n, _, h, w = x.shape
        p = self.patch_size
        x = self.conv_proj(x)
        x = x.reshape(n, self.hidden_dim, (h // p) * (w // p))
        return x.permute(0, 2, 1)

    def forward(self, x):
        x = self._process_input(x)
        n = x.shape[0]
        batch_class_token = self.class_token.expand(n, -1, -1)
        x = torch.cat([batch_class_token, x], dim=1)
        x = self.encoder(x)
        x = x[:, 0]
        return self.heads(x)


def vit_torchvision(seed=0, dtype=torch.float32):
    return _build(TorchvisionViT, seed, dtype)


# --------------------------------------------------------------------------------------------------
# MLP-Mixer (timm): token-mixing MLP on the transposed axis, channel MLP
# --------------------------------------------------------------------------------------------------

class MixerBlock(nn.Module):
    def __init__(self, dim, seq_len, mlp_ratio=(0.5, 2.0)):
        super().__init__()
        tokens_dim, channels_dim = (int(r * dim) for r in mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_tokens = Mlp(seq_len, tokens_dim)
        self.drop_path = nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_channels = Mlp(dim, channels_dim)

    def forward(self, x):
        x = x + self.drop_path(self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2))
        x = x + self.drop_path(self.mlp_channels(self.norm2(x)))
        return x


class MlpMixer(nn.Module):
    def __init__(self, dim=16, depth=2):
        super().__init__()
        self.stem = PatchEmbed(dim=dim)
        self.blocks = nn.Sequential(*[MixerBlock(dim, self.stem.num_patches) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = self.norm(x)
        x = x.mean(dim=1)
        return self.head(x)


def mlp_mixer(seed=0, dtype=torch.float32, width=16):
    return _build(lambda: MlpMixer(width), seed, dtype)


# --------------------------------------------------------------------------------------------------
# Hugging Face transformers, tiny configurations (2 layers, width 64), random weights
# --------------------------------------------------------------------------------------------------

def _hf(family: str, seed: int, dtype: torch.dtype):
    import pytest

    pytest.importorskip("transformers")
    from intertwiners.model_specs import hf_tiny

    model = hf_tiny(family, seed=seed).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    randomize_norms(model, g)
    _randomize_rms_norms(model, g)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, TOKENS), generator=g)
    return model, ids


def _randomize_rms_norms(model: nn.Module, g: torch.Generator) -> None:
    """Llama's RMSNorm weights start at 1: make them random too (any module named *RMSNorm with a weight)."""
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), torch.Tensor):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))


def gpt2_tiny(seed=0, dtype=torch.float32):
    """GPT2LMHeadModel (tied unembedding, transformers' Conv1D, tanh-GELU); output ``.logits`` (2, 16, vocab)."""
    return _hf("gpt2", seed, dtype)


def bert_tiny(seed=0, dtype=torch.float32):
    """BertModel (post-norm, token type and position embeddings); ``.last_hidden_state`` (2, 16, 64)."""
    return _hf("bert", seed, dtype)


def bert_mlm_tiny(seed=0, dtype=torch.float32):
    """BertForMaskedLM (prediction head with GELU and LayerNorm, decoder tied to the word embeddings); ``.logits``."""
    return _hf("bert-mlm", seed, dtype)


def llama_tiny(seed=0, dtype=torch.float32):
    """LlamaForCausalLM (RMSNorm, rotary embeddings, grouped-query attention, gated SiLU MLP); ``.logits``."""
    return _hf("llama", seed, dtype)


def hf_family(name: str, seed=0, dtype=torch.float32, vocab=100):
    """More transformers families in tiny configurations (2 layers, width 64, 4 heads), random weights and
    norms, input 2 x 12 token ids (an image batch for ``vit``): GPT-NeoX (fused per-head qkv, partial rotary),
    Phi (partial rotary, parallel attention and MLP), Gemma (RMSNorm gain 1 + w, scaled embeddings,
    multi-query attention, gated tanh-GELU), GPT-Neo (written-out attention, mask by ``torch.where``),
    OPT, DistilBERT, RoBERTa, Mistral, Qwen2 (qkv biases), Qwen3 and Gemma 3 (queries/keys normalised per head),
    OLMo 2 (queries/keys normalised over the whole projection), ViT."""
    import pytest

    tf = pytest.importorskip("transformers")
    c = dict(vocab_size=vocab)
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=40)
    lm = dict(use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=None, **c)
    build = {
        "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(intermediate_size=128, **common, **lm)),
        "phi": lambda: tf.PhiForCausalLM(tf.PhiConfig(intermediate_size=128, **common, **lm)),
        "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(intermediate_size=128, num_key_value_heads=1, head_dim=16,
                                                            **common, **lm)),
        "gpt_neo": lambda: tf.GPTNeoForCausalLM(tf.GPTNeoConfig(hidden_size=64, num_layers=2, num_heads=4,
                                                                attention_types=[[["global", "local"], 1]],
                                                                max_position_embeddings=40, **lm)),
        "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                      ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=40,
                                                      **lm)),
        "distilbert": lambda: tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=40, **c)),
        "roberta": lambda: tf.RobertaForMaskedLM(tf.RobertaConfig(intermediate_size=128, **common, **c)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(intermediate_size=128, num_key_value_heads=2,
                                                                  **common, **lm)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(intermediate_size=128, num_key_value_heads=2,
                                                            **common, **lm)),
        "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(intermediate_size=128, num_key_value_heads=2, head_dim=16,
                                                            **common, **lm)),
        "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(intermediate_size=128, num_key_value_heads=2,
                                                                   head_dim=16, sliding_window=4, **common, **lm)),
        "olmo2": lambda: tf.Olmo2ForCausalLM(tf.Olmo2Config(intermediate_size=128, num_key_value_heads=2,
                                                            **common, **lm)),
        "vit": lambda: tf.ViTForImageClassification(tf.ViTConfig(intermediate_size=128, image_size=16, patch_size=4,
                                                                 num_labels=NUM_CLASSES, hidden_size=64,
                                                                 num_hidden_layers=2, num_attention_heads=4)),
    }
    if name not in build:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(build)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build[name]()
    g = torch.Generator().manual_seed(seed + 1)
    randomize_norms(model, g)
    _randomize_rms_norms(model, g)
    model = model.to(dtype).eval()
    if name == "vit":
        return model, torch.randn(BATCH, 3, SIDE, SIDE, generator=g, dtype=torch.float64).to(dtype)
    return model, torch.randint(0, vocab, (BATCH, 12), generator=g)


HF_FAMILIES = ("gpt_neox", "phi", "gemma", "gpt_neo", "opt", "distilbert", "roberta", "mistral", "qwen2", "qwen3",
               "gemma3", "olmo2", "vit")
"""Families built by :func:`hf_family`. Gemma, Mistral and Qwen2 compute their RMSNorm in float32 and GPT-Neo
its attention scores, even in a float64 model: their outputs agree to ~1e-7 / ~1e-8, not 1e-15."""

REPLICAS = {
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3": mobilenet_v3,
    "efficientnet": efficientnet,
    "convnext": convnext,
    "regnet_x": regnet_x,
    "densenet": densenet,
    "resnet18": resnet18,
    "vit_timm": vit_timm,
    "vit_timm_softmax": vit_timm_softmax,
    "vit_torchvision": vit_torchvision,
    "mlp_mixer": mlp_mixer,
}
"""The vision replicas: name -> builder(seed=0, dtype=torch.float32) -> (model, example_input)."""

HF_REPLICAS = {"gpt2": gpt2_tiny, "bert": bert_tiny, "bert_mlm": bert_mlm_tiny, "llama": llama_tiny}
"""The transformers replicas (skip the calling test when transformers is missing)."""


def output_tensor(y) -> torch.Tensor:
    """The main output: the tensor itself, ``.logits`` or ``.last_hidden_state`` of a transformers output."""
    if isinstance(y, torch.Tensor):
        return y
    for key in ("logits", "last_hidden_state"):
        if key in y:
            return y[key]
    raise TypeError(f"no main output in {type(y).__name__}")


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

