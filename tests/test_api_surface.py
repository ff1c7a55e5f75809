"""The public surface of ../shared/API.md: names and signatures stay as promised."""

import inspect

import numpy as np
import torch

import intertwiners as it
from intertwiners import data, dissection, models, similarity, stitching


def params(fn):
    return list(inspect.signature(fn).parameters)


def test_section_3_names():
    G = it.intertwiner_group("relu")
    assert G.kind == "positive_scaled_permutation" and isinstance(G.description, str)
    assert params(G.sample)[:3] == ["n", "generator", "dtype"]
    assert inspect.signature(G.contains).parameters["atol"].default == 1e-6
    assert G.dimension(5) == 5 and it.intertwiner_group("identity").dimension(3) == 9
    assert it.intertwiner_group("sigmoid").dimension(4) == 0
    assert params(it.activation_sites)[:2] == ["model", "example_input"]
    assert params(it.symmetry_spec)[:2] == ["model", "example_input"]
    assert params(it.random_symmetry)[:2] == ["spec", "generator"]
    assert params(it.apply_symmetry)[:3] == ["model", "elements", "spec"]
    net = models.mlp(4, hidden=(3,))
    spec = it.symmetry_spec(net, torch.randn(2, 4))
    (space,) = spec.spaces.values()
    assert space.size == 3 and space.sites == ["act1"] and space.group.kind == "positive_scaled_permutation"
    assert isinstance(spec.pinned, dict)


def test_models_data_features_names():
    assert params(models.myrtle_cnn)[:5] == ["width", "num_classes", "in_channels", "activation", "batch_norm"]
    assert params(models.resnet20)[:3] == ["num_classes", "activation", "shortcut"]
    assert params(models.mlp)[:4] == ["in_features", "hidden", "num_classes", "activation"]
    assert params(data.load)[:2] == ["name", "root"]
    assert params(it.extract_features)[:3] == ["model", "sites", "inputs_or_loader"]
    assert callable(models.save) and callable(models.load)


def test_stitching_similarity_dissection_names():
    assert params(stitching.stitch)[:6] == ["front", "back", "site", "kind", "train_data", "test_data"]
    for name in ("epochs", "rank", "seed"):
        assert name in params(stitching.stitch)
    cka = inspect.signature(similarity.cka).parameters
    assert cka["kernel"].default == "linear" and cka["estimator"].default == "unbiased"
    proc = inspect.signature(similarity.procrustes).parameters
    assert proc["group"].default == "grelu" and proc["center"].default is False
    assert params(similarity.max_kernel)[:2] == ["X", "Y"]
    m = similarity.MinibatchCKA(kernel="linear")
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.normal(size=(16, 5))
        m.update(x, x @ rng.normal(size=(5, 5)))
    assert -1 <= m.compute() <= 1
    assert params(dissection.random_rotation)[:2] == ["n", "generator"]
    assert params(dissection.rotation_power)[:2] == ["Q", "alpha"]
    d = inspect.signature(dissection.dissect).parameters
    assert list(d)[:4] == ["model", "site", "dataset", "rotation"]
    assert d["quantile"].default == 0.005 and d["iou_threshold"].default == 0.04
    assert "seed" in inspect.signature(dissection.make_synthetic_broden).parameters
    assert callable(dissection.BrodenDataset)


def test_alignment_names():
    assert params(it.align)[:5] == ["model_a", "model_b", "data", "example_input", "method"]
    assert inspect.signature(it.align).parameters["method"].default == "activations"
    interp = inspect.signature(it.interpolate).parameters
    assert list(interp)[:6] == ["model_a", "model_b", "data", "alphas", "reset_batchnorm", "train_data"]
    assert interp["reset_batchnorm"].default is True and interp["train_data"].default is None
    assert params(it.merge)[:2] == ["models", "data"]
    assert params(it.canonicalize)[:2] == ["model", "example_input"]
    net = models.mlp(4, hidden=(3,))
    x = torch.randn(64, 4)
    r = it.align(net, net, x)
    assert set(r.elements) == {"act1"} and r.elements["act1"].shape == (3, 3)
    curve = it.interpolate(net, r.model, (x, torch.zeros(64, dtype=torch.long)), alphas=[0, 1])
    assert set(curve.barrier) == {"loss", "accuracy"} and len(curve.loss) == len(curve.accuracy) == 2
