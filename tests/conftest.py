import fcntl
import json
import os

import numba
import pytest
import torch
from hypothesis import HealthCheck, settings

# Two workers share two cores: one torch thread each keeps them from oversubscribing. numba's OpenMP threading
# layer, when it starts (the first parallel numba call, e.g. a permutation test), resets the OpenMP thread count,
# which is torch's too: started mid-run it put every later test of that worker on two spinning torch threads (3-4x
# the CPU time on a busy machine). Started here, before the cap, it leaves the cap in place.
numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
torch.set_num_threads(1)
settings.register_profile("ci", deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The files holding the longest tests (10 s to 30 s of CPU each), run first. pytest-xdist's default
# scheduler hands tests out in collection order as workers free up, so a long test collected in the
# middle of the suite starts late and can end alone after everything else: started first, it runs beside
# the rest. Whole files move, so their module fixtures are still set up once.
LONGEST_FIRST = ("test_experiments_integration.py", "test_experiments_alignment.py", "test_experiments_ray.py",
                 "test_experiments.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def trained_once(tmp_path_factory):
    """``trained_once(name, train)``: ``train()``'s ``(model, metrics)`` (a model of :mod:`intertwiners.models`
    and a JSON-able dict, as :func:`intertwiners.training.train_one` returns), computed once per test run.

    Under pytest-xdist every worker has its own session fixtures, so a model trained for tests that land on
    both workers would be trained twice. The first worker to ask saves it (safetensors) in the run's temporary
    folder, common to all its workers; the others wait on a file lock and load it. Without xdist it is saved
    and loaded alike, so both ways hand out the same weights.
    """
    from intertwiners import models
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # <run>/popen-gwN -> <run>: this run's folder, shared by its workers

    def get(name: str, train):
        folder = root / f"trained-{name}"
        with open(root / f"trained-{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not folder.is_dir():
                model, metrics = train()
                part = root / f"trained-{name}.partial"
                models.save(model, part)
                (part / "metrics.json").write_text(json.dumps(metrics))
                part.rename(folder)
        return models.load(folder), json.loads((folder / "metrics.json").read_text())

    return get


@pytest.fixture(scope="session")
def myrtle8_digits(digits, trained_once):
    """``myrtle8_digits(seed)``: train_one's ``(model, metrics)`` for a width-8 Myrtle CNN trained on digits
    for 3 epochs with ``seed``; each seed is trained once per test run (stitching and training tests share it)."""
    from intertwiners.training import train_one

    def get(seed: int):
        return trained_once(f"myrtle8-digits-3ep-seed{seed}", lambda: train_one(
            "myrtle_cnn", "digits", seed, epochs=3, progress=False, data=digits, width=8))

    return get


@pytest.fixture(scope="session")
def digits():
    from intertwiners import data
    return data.load("digits")


def warmed(model, x, steps=3):
    """Give batch norm non-trivial running statistics (a few train-mode forwards on shifted inputs)."""
    model.train()
    with torch.no_grad():
        for k in range(steps):
            model(1.5 * x + 0.3 * (k + 1))
    return model.eval()


@pytest.fixture
def scipy_side():
    """side(e) for an :class:`intertwiners.stats.Evidence`: +1 / -1 / 0 as scipy.stats' 95% t-interval lies on
    the claimed side of the threshold, on the other side, or contains it (0 also where scipy has no interval)
    -- an implementation independent of intertwiners.stats, for checking claim verdicts."""
    import numpy as np
    from scipy import stats as sps

    def side(e) -> int:
        if e.b is None:
            res = sps.ttest_1samp(e.a, 0.0)
        elif e.paired:
            res = sps.ttest_rel(e.a, e.b)
        else:
            res = sps.ttest_ind(e.a, e.b, equal_var=False)
        lo, hi = res.confidence_interval(0.95)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            return 0
        return e.direction * (1 if lo > e.threshold else (-1 if hi < e.threshold else 0))

    return side


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test starts on the one torch thread the module header sets: a test whose code raises the count (an
    OpenMP runtime started late, a thread cap that is not undone) must not leave its worker's later tests on
    threads that compete with the other worker for the two cores."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def no_safety_pins(request, monkeypatch):
    """Every spec built in the tests passes the safety check untouched: a space pinned by it is a rule bug (the
    engine derived a symmetry that is not one). Tests that build a wrong rule on purpose say so with
    ``@pytest.mark.safety_pins``; every other test fails on a safety pin, naming the space and the error."""
    if request.node.get_closest_marker("safety_pins") is not None:
        yield []
        return
    from intertwiners.symmetries import derive

    pins = []
    real = derive.safety_check

    def recording(model, args, spec, *rest, **kwargs):
        checked = real(model, args, spec, *rest, **kwargs)
        pins.extend((name, why) for name, why in checked.pinned.items() if name not in spec.pinned)
        return checked

    monkeypatch.setattr(derive, "safety_check", recording)
    yield pins
    assert not pins, "the safety check pinned derived spaces (a rule bug):\n" + "\n".join(f"{n}: {w}" for n, w in pins)
