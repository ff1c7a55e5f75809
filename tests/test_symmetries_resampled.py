"""Parameters through a map that is linear and the same for every channel (a ViT's position table interpolated to
the input's grid: DINOv2 or a ViT at another resolution), and every interpolation mode on hidden values. Each
derived space is checked as derived (no safety net); each table moved otherwise than with its channels, and each
interpolation across channels, is shown to change the outputs or to pin."""

import copy

import pytest
import torch
import torch.nn.functional as F
from symmetry_checks import Logits, randomised
from torch import nn

from intertwiners.symmetries import apply_symmetry, random_symmetry, symmetry_spec, verify_symmetry

GRID, D = 3, 6


class ResizedPositions(nn.Module):
    """A ViT whose position table (1, 1 + GRID², D) -- a class token's position and a GRID × GRID grid -- is resized
    to the input's 4 × 4 patches (``mode``): the grid reshaped to (1, D, GRID, GRID), interpolated, flattened back
    and concatenated with the class token's position (``class_pos``: sliced ``pos[:, :1]`` as in transformers'
    ViT, or selected ``pos[:, 0].unsqueeze(0)`` as in DINOv2); ``channels_first``: the grid is stored
    (1, D, GRID, GRID) and read ``flatten(2).transpose(1, 2)`` after the interpolation."""

    def __init__(self, mode="bicubic", antialias=False, class_pos="slice", channels_first=False):
        super().__init__()
        self.mode, self.antialias, self.class_pos, self.channels_first = mode, antialias, class_pos, channels_first
        self.patch = nn.Conv2d(3, D, 2, stride=2)
        self.cls = nn.Parameter(torch.randn(1, 1, D))
        if channels_first:
            self.cls_pos, self.pos = nn.Parameter(torch.randn(1, 1, D)), nn.Parameter(torch.randn(1, D, GRID, GRID))
        else:
            self.pos = nn.Parameter(torch.randn(1, 1 + GRID * GRID, D))
        self.fc1, self.fc2, self.head = nn.Linear(D, 8), nn.Linear(8, D), nn.Linear(D, 2)

    def positions(self, h, w):
        kw = {} if self.mode.startswith("nearest") else {"align_corners": False, "antialias": self.antialias}
        if self.channels_first:
            grid = F.interpolate(self.pos, size=(h, w), mode=self.mode, **kw)
            return torch.cat([self.cls_pos, grid.flatten(2).transpose(1, 2)], dim=1)
        first = self.pos[:, :1] if self.class_pos == "slice" else self.pos[:, 0].unsqueeze(0)
        grid = self.pos[:, 1:].reshape(1, GRID, GRID, D).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode=self.mode, **kw)
        return torch.cat([first, grid.permute(0, 2, 3, 1).reshape(1, h * w, D)], dim=1)

    def forward(self, x):                                      # (B, 3, 8, 8) -> 4 × 4 patches
        p = self.patch(x)
        tokens = p.flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], 1) + self.positions(*p.shape[2:])
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(h.mean(1))   # every token reaches the output


X = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mode, antialias, class_pos, channels_first", [
    ("bicubic", False, "slice", False), ("bicubic", True, "select", False), ("bilinear", True, "slice", False),
    ("nearest", False, "select", False), ("nearest-exact", False, "slice", False), ("bicubic", False, "", True)])
def test_a_position_table_resized_to_the_grid_moves_with_the_residual_stream(mode, antialias, class_pos,
                                                                              channels_first):
    """The stream (D channels) is one space and the table moves along its channel axis: exact as derived, and
    the interpolated table moved with another permutation than the stream's changes the outputs."""
    model = randomised(ResizedPositions(mode, antialias, class_pos, channels_first))
    spec = symmetry_spec(model, X, check=False)
    assert not spec.pinned, spec.pinned
    assert sorted(s.size for s in spec.spaces.values()) == [D, 8]
    report = verify_symmetry(model, X, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    assert not torch.equal(new.pos, model.pos)
    wrong = copy.deepcopy(new)
    with torch.no_grad():
        wrong.pos.copy_(model.pos)   # the stream moved, the table left where it was
    assert (wrong(X) - model(X)).abs().max() > 1e-4


class ChannelInterpolated(nn.Module):
    """A position table (1, T, C) interpolated along its last axis (the channels) to the stream's width: a map
    across channels, which no transform of the channels commutes with."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(4, D), nn.Linear(D, 2)
        self.pos = nn.Parameter(torch.randn(1, 3, 4))

    def forward(self, x):                                      # (B, 3, 4)
        return self.out(torch.relu(self.inp(x) + F.interpolate(self.pos, size=D, mode="linear")))


def test_a_table_interpolated_across_its_channels_pins_the_stream():
    model = randomised(ChannelInterpolated())
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    spec = symmetry_spec(model, x, check=False)
    assert not spec.spaces and any("adds an untransformed tensor" in r for r in spec.pinned.values()), spec.pinned
    # the pin is needed: permuting the stream and the table's (interpolated) channels alike changes the outputs
    perm = torch.tensor([1, 0, 2, 3, 4, 5])
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.inp.weight.copy_(model.inp.weight[perm])
        moved.inp.bias.copy_(model.inp.bias[perm])
        moved.out.weight.copy_(model.out.weight[:, perm])
    assert (moved(x) - model(x)).abs().max() > 1e-4


class Resampling(nn.Module):
    """A hidden value resampled between two convolutions (``mode``: 1-D, 2-D or 3-D)."""

    def __init__(self, mode, dims):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.mode, self.a, self.b = mode, conv(3, 5, 1), conv(5, 2, 1)

    def forward(self, x):
        kw = {} if self.mode.startswith("nearest") or self.mode == "area" else {"align_corners": False}
        if self.mode == "bilinear-aa":
            return self.b(F.interpolate(torch.relu(self.a(x)), scale_factor=0.5, mode="bilinear", antialias=True))
        return self.b(F.interpolate(torch.relu(self.a(x)), scale_factor=2, mode=self.mode, **kw))


@pytest.mark.parametrize("mode, dims", [("linear", 1), ("nearest", 1), ("bicubic", 2), ("nearest-exact", 2),
                                        ("bilinear-aa", 2), ("trilinear", 3), ("nearest", 3)])
def test_every_interpolation_mode_acts_on_each_channel_alike(mode, dims):
    model = randomised(Resampling(mode, dims))
    x = torch.randn((2, 3) + (4,) * dims, dtype=torch.float64)
    spec = symmetry_spec(model, x, check=False)
    assert not spec.pinned and [s.size for s in spec.spaces.values()] == [5], spec.pinned
    report = verify_symmetry(model, x, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12


@pytest.mark.parametrize("size", [32, 16])
def test_transformers_dinov2_at_another_resolution_keeps_its_residual_stream(size):
    """DINOv2 interpolates its position table (bicubic, anti-aliased) whenever the input is not its native size:
    the residual stream is a space at both sizes, exact as derived."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=4, num_labels=3)
    torch.manual_seed(0)
    wrapped = Logits(transformers.Dinov2ForImageClassification(cfg).double().eval())
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    spec = symmetry_spec(wrapped, x, check=False)
    assert not spec.pinned, spec.pinned
    assert 32 in [s.size for s in spec.spaces.values()]
    report = verify_symmetry(wrapped, x, spec=spec, trials=2)
    assert report.ok and report.max_rel <= 1e-10


class WindowedPositions(nn.Module):
    """SAM 2's (HieraDet's) positions: a table (1, C, GRID, GRID) interpolated to the input's grid plus a window
    table (1, C, 2, 2) tiled over it (``tile``), moved to channels-last and added to the (B, H, W, C) stream; the
    tokens then tiled (``tile`` of a hidden value) before the head."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, D, 2, stride=2)
        self.pos, self.window = nn.Parameter(torch.randn(1, D, GRID, GRID)), nn.Parameter(torch.randn(1, D, 2, 2))
        self.fc, self.head = nn.Linear(D, D), nn.Linear(D, 2)

    def forward(self, x):                                      # (B, 3, 8, 8) -> (B, 4, 4, D)
        h = self.patch(x).permute(0, 2, 3, 1)
        pos = F.interpolate(self.pos, size=h.shape[1:3], mode="bicubic") + self.window.tile((2, 2))
        h = torch.relu(self.fc(h + pos.permute(0, 2, 3, 1)))
        return self.head(h.flatten(1, 2).tile((1, 2, 1)).mean(1))


def test_a_tiled_window_table_added_to_an_interpolated_table_moves_with_the_stream():
    model = randomised(WindowedPositions())
    spec = symmetry_spec(model, X, check=False)
    assert not spec.pinned, spec.pinned
    assert sorted(s.size for s in spec.spaces.values()) == [D, D]
    report = verify_symmetry(model, X, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    assert not torch.equal(new.pos, model.pos) and not torch.equal(new.window, model.window)
    wrong = copy.deepcopy(new)
    with torch.no_grad():
        wrong.window.copy_(model.window)   # the window table left where it was
    assert (wrong(X) - model(X)).abs().max() > 1e-4


class PickedBiases(nn.Module):
    """LeViT's attention biases: a table (heads, offsets) whose entries are picked per query/key pair by an index
    buffer, ``biases[:, idxs]`` (heads, N, N), added to the scores of attention written out."""

    def __init__(self, heads=2, width=3, tokens=4, offsets=5):
        super().__init__()
        self.h, self.w = heads, width
        self.inp, self.qkv, self.proj = nn.Linear(4, D), nn.Linear(D, 3 * heads * width), nn.Linear(heads * width, 2)
        self.biases = nn.Parameter(torch.randn(heads, offsets))
        idx = torch.arange(tokens)
        self.register_buffer("idxs", (idx[:, None] - idx[None, :]).abs() % offsets, persistent=False)

    def forward(self, x):                                      # (B, N, 4)
        B, N, _ = x.shape
        q, k, v = self.qkv(torch.relu(self.inp(x))).view(B, N, 3, self.h, self.w).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1)) * self.w ** -0.5 + self.biases[:, self.idxs]
        return self.proj((a.softmax(-1) @ v).transpose(1, 2).reshape(B, N, -1)).mean(1)


def test_attention_biases_picked_by_an_index_move_with_the_heads():
    """The table's head axis is a per-head coordinate of the attention group: the heads permute, the table's rows
    with them; exact as derived. The heads permuted without the table changes the outputs."""
    model = randomised(PickedBiases())
    x = torch.randn(2, 4, 4, dtype=torch.float64)
    spec = symmetry_spec(model, x, check=False)
    assert not spec.pinned, spec.pinned
    (name, space), = [(n, s) for n, s in spec.spaces.items() if s.kind == "attention_heads"]
    assert space.group.permute_heads and space.group.per_head == 1
    report = verify_symmetry(model, x, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12
    group = space.group
    swap = group.block_matrix(torch.tensor([1, 0]), torch.eye(group.dk, dtype=torch.float64).expand(2, -1, -1)
                              .contiguous(), torch.eye(group.dv, dtype=torch.float64).expand(2, -1, -1).contiguous())
    moved = apply_symmetry(model, {name: swap.dense()}, spec)
    assert torch.equal(moved.biases, model.biases.flip(0))
    torch.testing.assert_close(moved(x), model(x), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        moved.biases.copy_(model.biases)   # the heads swapped, the table left in place
    assert (moved(x) - model(x)).abs().max() > 1e-6


class PooledAlongTheChannels(nn.Module):
    """A table (3, D, 4) average-pooled unbatched (``avg_pool2d`` reads it as (C, H, W)) along its second axis,
    which then meets the stream's D channels: the pooling mixes neighbouring channels."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(4, D), nn.Linear(D, 2)
        self.table = nn.Parameter(torch.randn(3, D, 4))

    def forward(self, x):                                      # (B, 4, 4)
        pooled = F.avg_pool2d(self.table, (3, 1), stride=1, padding=(1, 0))   # (3, D, 4): H = D mixed
        return self.out(torch.relu(self.inp(x) + pooled[0].t()))


def test_an_unbatched_pooling_mixes_its_own_last_axes():
    model = randomised(PooledAlongTheChannels())
    x = torch.randn(2, 4, 4, dtype=torch.float64)
    spec = symmetry_spec(model, x, check=False)
    assert not spec.spaces and any("adds an untransformed tensor" in r for r in spec.pinned.values()), spec.pinned
    assert verify_symmetry(model, x, spec=spec, trials=2).ok
