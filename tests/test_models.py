import pytest
import torch
from torch import nn

from intertwiners import activation_sites, models
from intertwiners.activations import Gaussian, Power, make_activation


@pytest.mark.parametrize("bn", [True, False])
def test_myrtle_shapes_and_sites(bn):
    m = models.myrtle_cnn(width=8, in_channels=3, input_size=32, batch_norm=bn).eval()
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 10)
    assert activation_sites(m, x) == ["relu1", "relu2", "relu3", "relu4"]
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64]
    # no conv bias with batch norm, bias without (REFERENCE.md)
    assert all((c.bias is None) == bn for c in convs)
    assert any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules()) == bn


def test_myrtle_rejects_bad_input_size():
    with pytest.raises(ValueError, match="multiple of 8"):
        models.myrtle_cnn(input_size=20)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_resnet20_has_19_sites(shortcut):
    m = models.resnet20(shortcut=shortcut).eval()
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 10)
    sites = activation_sites(m, x)
    assert len(sites) == 19
    assert sites[0] == "relu" and sites[1:3] == ["layer1.0.relu1", "layer1.0.relu2"]
    n_params = sum(p.numel() for p in m.parameters())
    # ~0.27M parameters for option A (He et al. 2016)
    assert (260_000 < n_params < 280_000) if shortcut == "A" else n_params > 270_000


def test_resnet20_leaky_relu_any_slope():
    m = models.resnet20(activation=nn.LeakyReLU(0.37))
    slopes = {mod.negative_slope for mod in m.modules() if isinstance(mod, nn.LeakyReLU)}
    assert slopes == {0.37}
    assert sum(isinstance(mod, nn.LeakyReLU) for mod in m.modules()) == 19
    assert m.intertwiners_config["kwargs"]["activation"] == "leaky_relu:0.37"


def test_option_a_shortcut_pads_with_zeros():
    s = models.PadShortcut(16, 32, 2)
    x = torch.randn(2, 16, 8, 8)
    y = s(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0


def test_mlp_sites():
    m = models.mlp(64, hidden=(32, 16, 8), num_classes=3, activation="tanh")
    x = torch.randn(5, 1, 8, 8)
    assert m(x).shape == (5, 3)
    assert activation_sites(m, x) == ["act1", "act2", "act3"]


@pytest.mark.parametrize("name", ["identity", "relu", "leaky_relu:0.2", "sigmoid", "tanh", "gelu", "silu",
                                  "elu", "softplus", "gaussian", "power:3", "abs"])
def test_activation_registry(name):
    act = make_activation(name)
    x = torch.linspace(-3, 3, 13)
    assert act(x).shape == x.shape
    if name == "gaussian":
        assert isinstance(act, Gaussian)
        assert torch.allclose(act(torch.zeros(1)), torch.tensor([0.3989422804]))
    if name == "power:3":
        assert isinstance(act, Power) and torch.allclose(act(x), x**3)


def test_unknown_activation_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown activation"):
        make_activation("swishy")


@pytest.mark.parametrize("build", [
    lambda: models.myrtle_cnn(width=4, in_channels=1, input_size=16),
    lambda: models.myrtle_cnn(width=4, in_channels=1, input_size=16, batch_norm=False, activation="sigmoid"),
    lambda: models.resnet20(shortcut="B", in_channels=1, widths=(4, 8, 8)),
    lambda: models.mlp(256, hidden=(7,), activation="leaky_relu:0.5"),
])
def test_save_load_round_trip(tmp_path, build):
    torch.manual_seed(0)
    m = build()
    m.train()
    x = torch.randn(4, 1, 16, 16)
    m(x)  # moves batch-norm running statistics away from their initial values
    m.eval()
    folder = models.save(m, tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    for source in (folder, folder / "model.safetensors"):
        loaded = models.load(source).eval()
        assert torch.equal(loaded(x), m(x))
        for (k, a), (k2, b) in zip(m.state_dict().items(), loaded.state_dict().items()):
            assert k == k2 and torch.equal(a, b)


def test_load_never_unpickles(tmp_path):
    """A pickle-based checkpoint with a code-running payload is refused and the payload does not run."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"x": Payload()}, folder / "model.safetensors")  # a pickle disguised as safetensors
    (folder / "config.json").write_text('{"arch": "mlp", "kwargs": {"in_features": 4}}')
    with pytest.raises(Exception):  # noqa: B017 - safetensors raises its own error type for non-safetensors
        models.load(folder)
    assert not marker.exists()
    torch.save({"x": Payload()}, folder / "model.pt")
    with pytest.raises(ValueError):
        models.load(folder / "model.pt")
    assert not marker.exists()


def test_save_rejects_foreign_models(tmp_path):
    with pytest.raises(ValueError, match="intertwiners_config"):
        models.save(nn.Linear(2, 2), tmp_path)
