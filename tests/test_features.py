import pytest
import torch
import torch.nn.functional as F
from torch import nn

from intertwiners import activation_sites, extract_features, models
from intertwiners.tracing import site_map, split_at, trace


class FunctionalBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)

    def forward(self, x):
        h = F.relu(self.a(x))
        h = torch.relu(self.b(h)) + x
        return h.relu()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.act = nn.Tanh()
        self.block = FunctionalBlock()
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = self.act(self.inp(x))
        h = self.act(self.block(h))  # the same module called twice
        return self.out(torch.sigmoid(h))


def test_sites_module_functional_and_repeated():
    net = Net()
    assert activation_sites(net, torch.randn(2, 4)) == [
        "act", "block:relu", "block:relu#1", "block:relu#2", "act#1", ":sigmoid"]


def test_extract_features_matches_manual_computation():
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(37, 4)
    feats = extract_features(net, ["block:relu#1", "act#1", ":sigmoid"], x, batch_size=8, device="cpu")
    h0 = torch.tanh(net.inp(x))
    r1 = torch.relu(net.block.b(torch.relu(net.block.a(h0))))
    expected_act1 = torch.tanh((r1 + h0).relu())
    assert torch.allclose(feats["block:relu#1"], r1)
    assert torch.allclose(feats["act#1"], expected_act1)
    assert torch.allclose(feats[":sigmoid"], torch.sigmoid(expected_act1))
    assert set(feats) == {"block:relu#1", "act#1", ":sigmoid"}


def test_extract_features_resnet_inplace_and_loader():
    torch.manual_seed(0)
    m = models.resnet20(in_channels=1, widths=(4, 8, 8))
    for mod in m.modules():
        if isinstance(mod, nn.ReLU):
            mod.inplace = True
    m.eval()
    x = torch.randn(10, 1, 16, 16)
    captured = {}

    def hook(_m, _i, out):
        captured.setdefault("v", out.clone())  # returns None: the output is not replaced

    m.layer1[0].relu1.register_forward_hook(hook)
    loader = [(x[:6], torch.zeros(6)), (x[6:], torch.zeros(4))]
    feats = extract_features(m, ["layer1.0.relu1", "layer3.2.relu2"], loader, device="cpu")
    assert feats["layer1.0.relu1"].shape == (10, 4, 16, 16)
    assert feats["layer3.2.relu2"].shape == (10, 8, 4, 4)
    assert torch.equal(feats["layer1.0.relu1"][:6], captured["v"])
    assert m.training is False


def test_extraction_restores_mode_and_uses_eval():
    m = models.myrtle_cnn(width=4, in_channels=1, input_size=16)
    m.train()
    x = torch.randn(8, 1, 16, 16)
    f = extract_features(m, "relu1", x, device="cpu")["relu1"]
    assert m.training and all(mod.training for mod in m.modules())
    m.eval()
    assert torch.equal(f, torch.relu(m.bn1(m.conv1(x))))


def test_unknown_site_lists_available():
    m = models.mlp(16, hidden=(3,))
    with pytest.raises(ValueError, match="act1"):
        extract_features(m, ["nope"], torch.randn(2, 16))


def test_untraceable_model_falls_back_to_hooks():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.act = nn.ReLU()

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
                x = -x
            return self.act(self.lin(x))

    m = Dynamic()
    x = torch.randn(5, 3)
    with pytest.warns(UserWarning, match="hooks"):
        assert activation_sites(m, x) == ["act"]
    feats = extract_features(m, ["act"], x)
    assert feats["act"].shape == (5, 3)


def test_split_at_front_back_compose():
    torch.manual_seed(0)
    m = models.myrtle_cnn(width=4, in_channels=1, input_size=16).eval()
    gm = trace(m)
    front, back = split_at(gm, site_map(gm)["relu2"].node)
    x = torch.randn(3, 1, 16, 16)
    assert torch.allclose(back(front(x)), m(x))
    r = models.resnet20(in_channels=1, widths=(4, 8, 8)).eval()
    gr = trace(r)
    f2, b2 = split_at(gr, site_map(gr)["layer2.0.relu2"].node)
    xr = torch.randn(2, 1, 16, 16)
    assert torch.allclose(b2(f2(xr)), r(xr))
    with pytest.raises(ValueError, match="residual"):
        split_at(gr, site_map(gr)["layer2.0.relu1"].node)
