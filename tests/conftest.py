"""Fresh random inputs for every run, reproducible on demand.

Each test that takes the `rng` fixture gets a NumPy Generator from a new random seed; the seed is
printed in the failure report. Re-run a failure with NPDIFF_TEST_SEED=<seed> pytest ...
"""

import os

import npdiff  # noqa: F401, I001  (first: it sets OpenBLAS's variables before numpy loads OpenBLAS)
import numpy as np
import pytest

try:
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
except ImportError:  # the test extra installs torch; tests that need it fail loudly without it
    torch = None


@pytest.fixture
def seed(request):
    value = int(os.environ.get("NPDIFF_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
    request.node.user_properties.append(("seed", value))
    return value


@pytest.fixture
def rng(seed):
    return np.random.default_rng(seed)


@pytest.fixture
def hash_cache(tmp_path, monkeypatch):
    """Model hashes are cached under $XDG_CACHE_HOME: a test's own, not the user's. -> the cache file."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "npdiff" / "hashes.json"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seeds = [v for k, v in item.user_properties if k == "seed"]
    if report.failed and seeds:
        report.sections.append(("random seed", f"NPDIFF_TEST_SEED={seeds[0]}"))
