"""tests/gpu: the CUDA backend. Tests marked `gpu` need CuPy, a visible CUDA device and torch with
CUDA (they compare against torch on the same GPU); everywhere else they are skipped with the reason.
The other tests here (launch arithmetic, argument checks, compiling the CUDA sources) run anywhere.

On a GPU machine: pip install -e '.[test,gpu]' && pytest tests/gpu -m gpu -rs
"""

import functools
import importlib.util
import sys
from pathlib import Path

import pytest

# tests/pipeline's tiny Stable Diffusion (tiny_sd.py) is used by the pipeline test here
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "pipeline"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CuPy, a CUDA device and torch with CUDA (skipped elsewhere)")


@functools.lru_cache(maxsize=None)
def gpu_missing():
    """None when the gpu tests can run here, else the reason they cannot."""
    if importlib.util.find_spec("cupy") is None:
        return "no GPU here: cupy is not installed (pip install -e '.[gpu]')"
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # the driver or the CUDA runtime is missing
        return f"no GPU here: cupy cannot see a CUDA device ({type(exc).__name__}: {exc})"
    if count == 0:
        return "no GPU here: no CUDA device visible"
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} has no CUDA: the gpu tests compare against torch on the same GPU"
    return None


def pytest_collection_modifyitems(config, items):
    reason = gpu_missing()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def cp():
    """The cupy module (only gpu-marked tests ask for it)."""
    import cupy

    return cupy


@pytest.fixture(scope="session", autouse=True)
def exact_torch_cuda():
    """torch's CUDA matmuls and convolutions in true float32 (TF32 off), as npdiff's cuBLAS calls."""
    if gpu_missing() is not None:
        yield
        return
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def cupy_backend(cp):
    """npdiff.backend on cupy (float32) for the test; numpy again afterwards."""
    from npdiff import backend

    backend.use("cupy")
    yield backend
    backend.use("numpy")
