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
