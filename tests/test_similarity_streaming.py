"""Streaming similarity between two models: the layer x layer matrix, Procrustes per layer, the CLI."""

import warnings

import numpy as np
import pytest
import torch

from intertwiners import extract_features, models
from intertwiners import similarity as sim
from intertwiners.cli import main
from intertwiners.similarity.plots import read_matrix_csv


def _model(seed, arch="myrtle_cnn"):
    torch.manual_seed(seed)
    if arch == "resnet20":
        return models.resnet20(in_channels=1, widths=(4, 8, 8))
    return models.myrtle_cnn(width=4, in_channels=1, input_size=16)


@pytest.fixture(scope="module")
def pair():
    return _model(0), _model(1)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(70, 1, 16, 16, generator=g)


@pytest.mark.parametrize("measure,kernel", [("cka", "linear"), ("grelu_cka", "max")])
def test_layer_matrix_equals_minibatch_cka_per_pair(pair, inputs, measure, kernel):
    a, b = pair
    sites = ["relu1", "relu2", "relu3", "relu4"]
    M, sa, sb = sim.layer_similarity_matrix(a, b, inputs, measure=measure, batch_size=32, device="cpu",
                                            return_sites=True)
    assert sa == sites and sb == sites and M.shape == (4, 4)
    # reference: features of each batch extracted independently, one MinibatchCKA per pair of sites
    ref = np.empty((4, 4))
    batches = [inputs[0:32], inputs[32:64], inputs[64:70]]
    fa = [extract_features(a, sites, xb) for xb in batches]
    fb = [extract_features(b, sites, xb) for xb in batches]
    for i, s in enumerate(sites):
        for j, t in enumerate(sites):
            m = sim.MinibatchCKA(kernel=kernel, drop_dead=True)
            for xa, xb in zip(fa, fb):
                m.update(xa[s], xb[t])
            ref[i, j] = m.compute()
    np.testing.assert_allclose(M, ref, rtol=1e-6, atol=1e-9)


def test_layer_matrix_streams_batches_and_warns_on_self_comparison(pair, inputs):
    a, _ = pair
    gen = (inputs[i:i + 16] for i in range(0, 64, 16))          # an iterable of batches, consumed once
    with pytest.warns(UserWarning, match="same object"):
        M = sim.layer_similarity_matrix(a, a, gen, sites_a=["relu2", "relu4"], measure="grelu_cka",
                                        device="cpu", batch_size=16)
    np.testing.assert_allclose(np.diag(M), 1.0, atol=1e-9)
    assert M.shape == (2, 2)


def test_layer_matrix_resnet20_all_sites(inputs):
    M = sim.layer_similarity_matrix(_model(0, "resnet20"), _model(1, "resnet20"), inputs[:48], measure="cka",
                                    batch_size=24, device="cpu")
    assert M.shape == (19, 19) and np.isfinite(M).all()


def test_layer_matrix_bad_arguments(pair, inputs):
    a, b = pair
    with pytest.raises(ValueError, match="procrustes_per_layer"):
        sim.layer_similarity_matrix(a, b, inputs, measure="grelu_procrustes")
    with pytest.raises(ValueError, match="measure"):
        sim.layer_similarity_matrix(a, b, inputs, measure="svcca")
    with pytest.raises(ValueError, match="at least 4"):
        sim.layer_similarity_matrix(a, b, inputs, measure="cka", batch_size=3)
    with pytest.raises(ValueError, match="unknown activation site"):
        sim.layer_similarity_matrix(a, b, inputs, sites_a=["conv9"])


def test_procrustes_per_layer_equals_procrustes_on_all_features(pair, inputs):
    a, b = pair
    sites = ["relu1", "relu3"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = sim.procrustes_per_layer(a, b, inputs, sites=sites, groups=("grelu", "orthogonal", "permutation"),
                                         batch_size=32, device="cpu", drop_dead=False)
    fa, fb = extract_features(a, sites, inputs), extract_features(b, sites, inputs)
    for s in sites:
        for g in ("grelu", "orthogonal", "permutation"):
            assert table[s][g] == pytest.approx(sim.procrustes(fa[s], fb[s], g), abs=1e-9)


def test_cli_similarity_writes_csv_heatmaps_and_table(tmp_path, pair, inputs, capsys):
    from intertwiners import data
    a, b = pair
    models.save(a, tmp_path / "a")
    models.save(b, tmp_path / "b")
    out = tmp_path / "out"
    rc = main(["similarity", str(tmp_path / "a"), str(tmp_path / "b"), "--max-samples", "64", "--batch-size",
               "32", "--measures", "grelu_cka,cka", "--procrustes", "grelu,orthogonal", "--device", "cpu",
               "--permutations", "20", "--out", str(out), "--quiet"])
    assert rc == 0
    for name in ("grelu_cka.csv", "grelu_cka.png", "cka.csv", "cka.png", "procrustes.csv", "similarity.json"):
        assert (out / name).stat().st_size > 0
    M, rows, cols = read_matrix_csv(out / "cka.csv")
    assert rows == cols == ["relu1", "relu2", "relu3", "relu4"]
    _, test = data.load("digits")
    ref = sim.layer_similarity_matrix(a, b, test, measure="cka", batch_size=32, max_samples=64, device="cpu")
    np.testing.assert_allclose(M, ref, atol=1e-6)
    printed = capsys.readouterr().out
    assert "relu4" in printed and "orthogonal" in printed and "permutation tests (20 shuffles" in printed
