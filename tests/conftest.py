import os

import numpy as np
import pytest

# Sharding tests need 8 devices; on CPU they are faked. Must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


@pytest.fixture
def rng():
    """Fresh random inputs each run; the seed is printed so a failure replays with PHI_TEST_SEED=<seed>."""
    seed = int(os.environ.get("PHI_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
    print(f"PHI_TEST_SEED={seed}")
    return np.random.default_rng(seed)
