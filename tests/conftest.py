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
