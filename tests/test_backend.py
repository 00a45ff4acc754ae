"""npdiff.backend: choosing numpy/cupy, the GPU's float16 option, moving arrays (no GPU needed).

On a machine without CuPy, use("cupy") must fail with the install hint; the dtype option is
checked before CuPy is imported, so its messages are tested here too. to_device's dtype plumbing
for the cupy backend is tested with a stand-in for cupy's asarray (the real thing is exercised by
tests/gpu on a GPU).
"""

import importlib.util

import numpy as np
import pytest

from npdiff import backend
from npdiff.errors import NpdiffError

HAVE_CUPY = importlib.util.find_spec("cupy") is not None


@pytest.fixture(autouse=True)
def restore_backend():
    yield
    backend._active, backend._device_dtype = "numpy", "float32"


@pytest.mark.skipif(HAVE_CUPY, reason="cupy is installed here: the no-cupy message cannot be seen")
@pytest.mark.parametrize("name", ["cupy", "cuda", "GPU"])
def test_cupy_without_cupy_says_how_to_install(name):
    with pytest.raises(NpdiffError, match=r"pip install -e '\.\[gpu\]'"):
        backend.use(name)
    assert backend.name() == "numpy"  # a failed use() changes nothing


def test_unknown_backend_is_named():
    with pytest.raises(NpdiffError, match="unknown backend 'tpu'; known: numpy, cupy"):
        backend.use("tpu")


@pytest.mark.parametrize("dtype", ["bfloat16", "float64", "int8", None, "no-such-type"])
def test_dtype_option_refuses_other_types(dtype):
    with pytest.raises(NpdiffError, match="dtype must be one of float32, float16, got"):
        backend.use("cupy", dtype=dtype)
    assert backend.compute_dtype() == "float32"


@pytest.mark.parametrize("dtype", ["float16", np.float16])
def test_float16_needs_the_cupy_backend(dtype):
    with pytest.raises(NpdiffError, match="dtype float16 needs the cupy backend"):
        backend.use("numpy", dtype=dtype)
    assert backend.name() == "numpy" and backend.compute_dtype() == "float32"


def test_numpy_backend_stays_float32(rng):
    assert backend.use("cpu", dtype=np.float32) == "numpy"
    assert backend.compute_dtype() == "float32"
    values = rng.standard_normal((3, 5))  # float64
    moved = backend.to_device(values.T)
    assert moved.dtype == np.float32 and moved.flags.c_contiguous
    np.testing.assert_array_equal(moved, values.T.astype(np.float32))
    ids = backend.to_device(np.arange(6).reshape(2, 3), dtype=np.int64)
    assert ids.dtype == np.int64
    assert backend.to_numpy(moved) is moved


class FakeCupy:
    """Stands in for cupy's asarray only: records the dtype to_device asks for."""

    def __init__(self):
        self.requested = []

    def asarray(self, a, dtype=None):
        self.requested.append(np.dtype(dtype).name)
        return np.asarray(a, dtype=dtype)


@pytest.mark.parametrize("device_dtype", ["float32", "float16"])
def test_to_device_on_cupy_uses_the_chosen_dtype(monkeypatch, rng, device_dtype):
    fake = FakeCupy()
    monkeypatch.setattr(backend, "_import_cupy", lambda: fake)
    assert backend.use("cuda", dtype=device_dtype) == "cupy"
    assert backend.compute_dtype() == device_dtype
    weights = backend.to_device(rng.standard_normal(4).astype(np.float32))
    ids = backend.to_device(np.arange(3), dtype=np.int64)
    assert weights.dtype == np.dtype(device_dtype) and ids.dtype == np.int64
    assert fake.requested == [device_dtype, "int64"]
    backend.use("numpy")
    assert backend.compute_dtype() == "float32"


# ---------------------------------------------------------------------------------------------
# The CLI's --device / --fp16 (they choose the backend before the model is loaded)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arguments,message", [
    (["--device", "cpu", "--fp16"], "--fp16 runs the model in float16 on the GPU: it needs --device cuda"),
    (["--fp16"], "--fp16 runs the model in float16 on the GPU: it needs --device cuda"),
    (["--device", "cuda", "--backend", "numpy"], "--device cuda and --backend numpy disagree"),
    (["--device", "cpu", "--backend", "cupy"], "--device cpu and --backend cupy disagree"),
])
def test_cli_device_options_are_checked(capsys, arguments, message):
    from npdiff import cli

    assert cli.main(["generate", "a red circle", *arguments]) == 2
    assert message in capsys.readouterr().err
    assert backend.name() == "numpy"


@pytest.mark.skipif(HAVE_CUPY, reason="cupy is installed here: the no-cupy message cannot be seen")
@pytest.mark.parametrize("arguments", [["--device", "cuda"], ["--device", "cuda", "--fp16"], ["--backend", "cuda"]])
def test_cli_device_cuda_without_cupy_says_how_to_install(capsys, tmp_path, arguments):
    from PIL import Image

    from npdiff import cli

    picture = tmp_path / "in.png"
    Image.new("RGB", (32, 32), "red").save(picture)  # a real picture: the input is checked before the device
    assert cli.main(["img2img", "a red circle", "--image", str(picture), "--out", str(tmp_path / "out.png"),
                     *arguments]) == 2
    assert "pip install -e '.[gpu]'" in capsys.readouterr().err


def test_cli_device_maps_to_backends():
    from npdiff import cli

    parser = cli.build_parser()
    for arguments, expected in [([], None), (["--device", "cpu"], "numpy"), (["--device", "cuda"], "cupy"),
                                (["--device", "cuda", "--fp16"], "cupy"), (["--backend", "cupy"], "cupy"),
                                (["--device", "cuda", "--backend", "GPU"], "cupy")]:
        assert cli.chosen_backend(parser.parse_args(["generate", "x", *arguments])) == expected


# ---------------------------------------------------------------------------------------------
# What `import npdiff` does (npdiff/startup.py): the same whichever npdiff module comes first
# ---------------------------------------------------------------------------------------------
def run_python(code, **env):
    import os
    import subprocess
    import sys

    environment = {**os.environ, **env}
    for name in ("OPENBLAS_CORETYPE", "NPDIFF_OPENBLAS_CORETYPE", "NPDIFF_BACKEND", "OPENBLAS_THREAD_TIMEOUT",
                 "NUMBA_THREADING_LAYER"):
        if name not in env:
            environment.pop(name, None)
    done = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout.strip(), done.stderr


STARTUP_REPORT = ("import os, npdiff.blas as b, npdiff.backend as be, npdiff.startup as s; "
                  "print(b._decision, os.environ.get('OPENBLAS_CORETYPE'), sorted(s.DECISIONS.items()), be.name(), "
                  "sep='|')")


@pytest.mark.parametrize("first", ["npdiff", "npdiff.kernels.conv", "npdiff.backend", "npdiff.blas"])
def test_startup_does_not_depend_on_import_order(first):
    code, out, err = run_python(f"import {first}; {STARTUP_REPORT}")
    assert code == 0, err
    _, expected, _ = run_python(f"import npdiff; {STARTUP_REPORT}")
    assert out == expected
    assert "too late" not in out


def test_startup_reads_the_backend_from_the_environment():
    code, out, err = run_python(f"import npdiff.kernels; {STARTUP_REPORT}", NPDIFF_BACKEND="CPU")
    assert code == 0, err
    assert out.endswith("|numpy")
    code, _, err = run_python("import npdiff.models", NPDIFF_BACKEND="tpu")
    assert code != 0 and "unknown backend 'tpu'; known: numpy, cupy" in err


def test_openblas_is_found_once():
    from npdiff import blas

    library = blas.openblas_library()
    assert blas.openblas_library() is library
    if library is not None:  # NumPy's wheels: OpenBLAS
        assert blas.get_num_threads() >= 1
        assert blas.openblas_corename()
