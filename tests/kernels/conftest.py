"""Fixtures of the kernel tests."""

import pytest

from npdiff.kernels.amx_intrinsics import amx_usable
from npdiff.kernels.bf16_rounding import bf16_kernel, cpu_has_avx512_bf16


@pytest.fixture(params=["amx", "dpbf16", "float32"])
def bf16_path(request, monkeypatch):
    """Run a bf16 kernel test on each bf16 GEMM: AMX tiles and vdpbf16ps (each skipped on a CPU
    without it) and the float32 GEMM of the rounded values (NPDIFF_NO_AMX=1 rules out AMX,
    NPDIFF_NO_BF16=1 both). The weights are packed inside the test, after the choice."""
    if request.param == "amx" and not amx_usable():
        pytest.skip("no AMX-BF16 here (or Linux refused the tile state)")
    if request.param == "dpbf16" and not cpu_has_avx512_bf16():
        pytest.skip("this CPU has no AVX512_BF16: only the float32 path can run here")
    monkeypatch.delenv("NPDIFF_NO_AMX", raising=False)
    monkeypatch.delenv("NPDIFF_NO_BF16", raising=False)
    if request.param == "dpbf16":
        monkeypatch.setenv("NPDIFF_NO_AMX", "1")
    if request.param == "float32":
        monkeypatch.setenv("NPDIFF_NO_BF16", "1")
    assert bf16_kernel() == request.param
    return request.param
