import fcntl
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Two workers share two cores: one torch thread each keeps them from oversubscribing.
torch.set_num_threads(1)
settings.register_profile("ci", deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def trained_once(tmp_path_factory):
    """``trained_once(name, make)``: ``make()``'s model (from :mod:`intertwiners.models`), made once per run.

    Under pytest-xdist every worker has its own session fixtures, so an expensive trained model asked for by
    tests on both workers would be trained twice. The first worker to get here saves it (safetensors) in the
    session's temporary folder, common to all workers; the others wait on a file lock and load it. Without
    xdist the model is saved and loaded alike, so both ways hand out the same weights in the same mode.
    """
    from intertwiners import models
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # <session>/popen-gwN -> <session>: this run's folder, shared by its workers

    def get(name: str, make):
        folder = root / f"trained-{name}"
        with open(root / f"trained-{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not folder.is_dir():
                models.save(make(), folder)
        return models.load(folder)

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
