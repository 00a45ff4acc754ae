"""Fresh random inputs for every run, reproducible on demand.

Each test that takes the `rng` fixture gets a NumPy Generator from a new random seed; the seed is
printed in the failure report. Re-run a failure with NPDIFF_TEST_SEED=<seed> pytest ...
"""

import os

# torch's OpenMP workers spin-wait between calls; on a shared or loaded machine a tiny reference conv then
# took 75-82 ms instead of 1.3-1.5 ms (measured): let them sleep. Set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # first, as nearly every user's script does: npdiff must be as fast and right so
import npdiff  # noqa: F401
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


@pytest.fixture(scope="session", autouse=True)
def private_cache_folder(tmp_path_factory):
    """No test writes into the user's ~/.cache/npdiff: the whole session caches (model hashes, the CLIP
    tokenizer rebuilt from openai-clip) in one folder of its own, and HOME points at an empty folder of
    its own too (npdiff.cache_folder reads HOME when XDG_CACHE_HOME is unset). One folder for the session,
    not one per test: rebuilding the tokenizer cache costs ~0.25 s. Subprocesses (the CLI) inherit both.
    Tests that look at the cache itself take `hash_cache` (a folder of the test's own)."""
    root = tmp_path_factory.mktemp("npdiff-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(root / "xdg-cache"))
        patch.setenv("HOME", str(root / "home"))
        (root / "home").mkdir()
        yield root


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
