"""Every cuda/*.cu compiles for sm_90a without a GPU (CI has nvcc but no GPU)."""
import shutil

import pytest

from tw import kernels

needs_nvcc = pytest.mark.skipif(not (shutil.which("nvcc") or __import__("os").path.exists("/usr/local/cuda/bin/nvcc")),
                                reason="nvcc not installed")


@needs_nvcc
@pytest.mark.parametrize("name", kernels.all_kernel_names())
def test_kernel_compiles_for_sm90a(name):
    path = kernels.compile(name, "sm_90a")
    assert path.stat().st_size > 0


@needs_nvcc
def test_cache_key_changes_with_defines_and_arch():
    a = kernels.cache_key("rmsnorm", None, "sm_90a", "cubin")
    assert a != kernels.cache_key("rmsnorm", {"X": 1}, "sm_90a", "cubin")
    assert a != kernels.cache_key("rmsnorm", None, "sm_80", "cubin")
    assert a == kernels.cache_key("rmsnorm", None, "sm_90a", "cubin")


def test_unknown_kernel_file_is_a_clear_error():
    with pytest.raises(kernels.KernelBuildError, match="no kernel file cuda/nope.cu"):
        kernels.source_path("nope")


@needs_nvcc
@pytest.mark.parametrize("tp", [2, 4, 8])
def test_p2p_kernels_compile_with_tp_constant(tp):
    assert kernels.compile("ar_norm_p2p", "sm_90a", {"TW_TP": tp}).stat().st_size > 0
