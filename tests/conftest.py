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
