"""similarity.permutation_test: the statistic is the measure, each null value is the measure on shuffled
samples (checked by recomputing it from scratch), p-values are uniform under independence and tiny for
related features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from intertwiners import similarity as sim
from intertwiners.similarity.permutation import MEASURES, permutations

DIRECT = {
    "linear_cka": lambda x, y: sim.cka(x, y, kernel="linear"),
    "rbf_cka": lambda x, y: sim.cka(x, y, kernel="rbf"),
    "grelu_cka": lambda x, y: sim.grelu_cka(x, y),
    "procrustes_orthogonal": lambda x, y: sim.procrustes(x, y, group="orthogonal"),
    "procrustes_permutation": lambda x, y: sim.procrustes(x, y, group="permutation"),
    "procrustes_grelu": lambda x, y: sim.procrustes(x, y, group="grelu"),
}


def related(n=40, d=6, noise=0.05, seed=0):
    """Y = X P D + small noise: related through an element of G_ReLU."""
    g = np.random.default_rng(seed)
    x = np.abs(g.normal(size=(n, d)))
    pd = np.eye(d)[g.permutation(d)] * g.uniform(0.5, 2.0, d)
    return x, x @ pd + noise * g.normal(size=(n, d))


@pytest.mark.parametrize("measure", MEASURES)
def test_statistic_and_null_are_the_measure_itself(measure):
    x, y = related(n=24, d=5, noise=1.0, seed=3)
    r = sim.permutation_test(x, y, measure=measure, n_permutations=6, generator=7)
    assert r.statistic == pytest.approx(DIRECT[measure](x, y), abs=1e-9)
    perms = permutations(24, 6, 7)   # the same draw: recompute each null value from scratch
    slow = [DIRECT[measure](x, y[p]) for p in perms]
    np.testing.assert_allclose(r.null_distribution, slow, atol=1e-9)
    assert r.chance_corrected == pytest.approx(r.statistic - np.mean(slow))
    assert r.pvalue == pytest.approx((1 + np.sum(np.asarray(slow) >= r.statistic - 1e-12)) / 7)


def test_spatial_features_shuffle_whole_samples():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, 2, 2, generator=g, dtype=torch.float64)
    y = x.flip(1) * 2 + 0.3 * torch.randn(12, 3, 2, 2, generator=g, dtype=torch.float64)
    for measure in ("grelu_cka", "procrustes_grelu", "linear_cka"):
        r = sim.permutation_test(x, y, measure=measure, n_permutations=4, generator=1)
        slow = [DIRECT[measure](x, y[torch.as_tensor(p)]) for p in permutations(12, 4, 1)]
        np.testing.assert_allclose(r.null_distribution, slow, atol=1e-9)


def test_procrustes_null_through_sample_pair_blocks_is_the_measure_on_shuffled_samples(monkeypatch):
    """Many positions per sample and many permutations take the pairwise route (X'Y_pi = sum_i X_i'Y_pi(i));
    each null value is still the measure recomputed on whole shuffled samples, and both routes agree."""
    from intertwiners.similarity.permutation import (
        PAIRWISE_POSITIONS,
        batched_products,
        pairwise_products,
        pairwise_route,
    )

    n, side = 10, 12                                  # 144 positions >= PAIRWISE_POSITIONS, 8 >= n / 2 shuffles
    assert side * side >= PAIRWISE_POSITIONS and pairwise_route(side * side, 8, n)
    assert not pairwise_route(side * side, 4, n) and not pairwise_route(PAIRWISE_POSITIONS - 1, 8, n)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, 3, side, side, generator=g, dtype=torch.float64).relu()
    y = x[:, [2, 0, 1]] * 1.5 + 0.5 * torch.randn(n, 3, side, side, generator=g, dtype=torch.float64)
    for measure in ("procrustes_grelu", "procrustes_orthogonal"):
        r = sim.permutation_test(x, y, measure=measure, n_permutations=8, generator=2)
        slow = [DIRECT[measure](x, y[torch.as_tensor(p)]) for p in permutations(n, 8, 2)]
        np.testing.assert_allclose(r.null_distribution, slow, atol=1e-9)
    xs, ys = x.permute(0, 2, 3, 1).reshape(n, -1, 3), y.permute(0, 2, 3, 1).reshape(n, -1, 3)
    perms = torch.as_tensor(permutations(n, 8, 2))
    loop = torch.stack([sum(xs[i].T @ ys[int(p[i])] for i in range(n)) for p in perms])
    torch.testing.assert_close(pairwise_products(xs, ys, perms), loop, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr("intertwiners.similarity.permutation.BATCH_BYTES", 3 * n * 9 * 8)   # bands of 3 rows
    torch.testing.assert_close(pairwise_products(xs, ys, perms), loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(batched_products(xs, ys, perms), loop, rtol=1e-12, atol=1e-12)
    # a different pairing of samples gives different products (the test can fail)
    assert not torch.allclose(pairwise_products(xs, ys, perms.flip(1)), loop)


def test_pvalues_are_uniform_on_independent_features():
    """200 independent pairs: the share of p < 0.05 lies in [2%, 9%] (it is 5% in expectation)."""
    rng = np.random.default_rng(2026)
    for measure in ("grelu_cka", "linear_cka"):
        p = []
        for _ in range(200):
            x, y = rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
            p.append(sim.permutation_test(x, y, measure=measure, n_permutations=99, generator=rng).pvalue)
        share = np.mean(np.asarray(p) < 0.05)
        assert 0.02 <= share <= 0.09, (measure, share)
        assert 0.35 < np.mean(p) < 0.65   # the mean of a uniform p-value is 1/2


@pytest.mark.parametrize("measure", MEASURES)
def test_related_features_are_far_above_chance(measure):
    x, y = related(n=60, d=6, noise=0.05, seed=1)
    r = sim.permutation_test(x, y, measure=measure, n_permutations=200, generator=0)
    assert r.pvalue < 0.01 and r.chance_corrected > 0


def test_generator_forms_and_bad_input():
    x, y = related(n=20, d=3)
    a = sim.permutation_test(x, y, "linear_cka", 10, generator=torch.Generator().manual_seed(5))
    b = sim.permutation_test(x, y, "linear_cka", 10, generator=torch.Generator().manual_seed(5))
    np.testing.assert_array_equal(a.null_distribution, b.null_distribution)
    assert a.n_permutations == 10
    c = sim.permutation_test(x, y, "linear_cka", 10, generator=np.random.default_rng(5))
    assert c.null_distribution.shape == (10,)
    with pytest.raises(ValueError, match="measure must be one of"):
        sim.permutation_test(x, y, "cka")
    with pytest.raises(ValueError, match="n_permutations"):
        sim.permutation_test(x, y, "linear_cka", 0)
    with pytest.raises(ValueError, match="N must match"):
        sim.permutation_test(x, y[:-1], "linear_cka", 5)
    with pytest.raises(ValueError, match="NaN"):
        sim.permutation_test(np.full((20, 3), np.nan), y, "grelu_cka", 5)


def test_cli_similarity_prints_and_writes_pvalues(tmp_path, capsys):
    from intertwiners import models
    from intertwiners.cli import main

    for seed in (0, 1):
        torch.manual_seed(seed)
        models.save(models.myrtle_cnn(width=4, in_channels=1, input_size=16), tmp_path / f"m{seed}")
    out = tmp_path / "out"
    rc = main(["similarity", str(tmp_path / "m0"), str(tmp_path / "m1"), "--max-samples", "48", "--batch-size", "16",
               "--measures", "grelu_cka,cka", "--procrustes", "grelu", "--permutations", "30",
               "--chance-corrected", "--device", "cpu", "--out", str(out), "--quiet"])
    assert rc == 0 and (out / "similarity.png").stat().st_size > 1000
    lines = (out / "pvalues.csv").read_text().splitlines()
    assert lines[0] == "site_a,site_b,measure,statistic,pvalue,chance_corrected"
    assert len(lines) == 1 + 4 * 3   # 4 sites x (grelu_cka, linear_cka, procrustes_grelu)
    p = [float(line.split(",")[4]) for line in lines[1:]]
    assert all(1 / 31 <= v <= 1 for v in p)
    printed = capsys.readouterr().out
    assert "permutation tests (30 shuffles of the first 48 samples" in printed and "chance-corrected" in printed


def slow_sequential_test(x, y, measure, max_draws, generator, h):
    """Besag & Clifford by hand: the measure on Y's shuffled samples, one draw at a time, stopping at the
    h-th null value >= the statistic (p = h / k), else p = (1 + hits) / (1 + max_draws)."""
    t, null = DIRECT[measure](x, y), []
    for p in permutations(x.shape[0], max_draws, generator):
        null.append(DIRECT[measure](x, y[p]))
        if np.sum(np.asarray(null) >= t - 1e-12) == h:
            return t, h / len(null), null
    return t, (1 + np.sum(np.asarray(null) >= t - 1e-12)) / (1 + max_draws), null


@pytest.mark.parametrize("measure", ["procrustes_orthogonal", "procrustes_grelu", "linear_cka"])
def test_sequential_test_matches_a_draw_by_draw_loop(measure):
    for noise, seed in ((3.0, 0), (0.05, 1)):        # typical (stops early) and extreme (runs every draw)
        x, y = related(n=16, d=3, noise=noise, seed=seed)
        r = sim.permutation_test(x, y, measure, 60, generator=seed, sequential=True, h=3)
        t, p, null = slow_sequential_test(x, y, measure, 60, seed, 3)
        assert r.statistic == pytest.approx(t, abs=1e-9) and r.pvalue == pytest.approx(p)
        np.testing.assert_allclose(r.null_distribution, null, atol=1e-9)
        assert r.n_permutations == len(null) and r.h == 3
    with pytest.raises(ValueError, match="positive integer"):
        sim.permutation_test(x, y, measure, 10, sequential=True, h=0)


def test_sequential_procrustes_rejects_at_most_five_percent_on_null_data():
    """100 independent pairs, sequential test (h = 4, at most 39 draws): the share of p <= 0.05 is at most
    5% within its 99% binomial interval, and typical values stop long before 39 draws."""
    from scipy.stats import binomtest

    rng = np.random.default_rng(7)
    p, draws = [], []
    for _ in range(100):
        x, y = rng.normal(size=(12, 2)), rng.normal(size=(12, 2))
        r = sim.permutation_test(x, y, "procrustes_orthogonal", 39, generator=rng, sequential=True, h=4)
        p.append(r.pvalue)
        draws.append(r.n_permutations)
    rejected = int(np.sum(np.asarray(p) <= 0.05))
    assert binomtest(rejected, 100).proportion_ci(0.99).low <= 0.05, rejected
    assert np.mean(draws) < 20


def test_a_permutation_test_leaves_torch_on_the_threads_the_user_set():
    """The first parallel numba loop of a process starts numba's OpenMP layer, which resets the OpenMP thread
    count that torch shares: without `_util.start_numba_threads` a user's torch.set_num_threads(1) became 2
    after a first G_ReLU-CKA permutation test on this 2-core machine. A fresh process, as a user's."""
    import subprocess
    import sys

    code = ("import torch, numpy as np\n"
            "torch.set_num_threads(1)\n"
            "x = torch.randn(64, 64); x @ x\n"
            "from intertwiners.similarity import permutation_test\n"
            "g = np.random.default_rng(0)\n"
            "permutation_test(g.random((300, 8)), g.random((300, 8)), measure='grelu_cka', n_permutations=200)\n"
            "print(torch.get_num_threads())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "1"
