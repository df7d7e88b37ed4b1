"""The multimem transport: its run-time guard (CPU only) and a PTX check of its kernel (nvcc only).

The guard is docs/design.md#rules, Rule 1 in code: on the lab's shared NVSwitch hosts an NVLink multicast object
must never be created, so MultimemComm must refuse before it touches cuda-bindings or a driver.
Nothing here creates a multicast object or runs a multimem kernel.
"""
import subprocess
import sys

import pytest

from tw.comm import multimem

FORBID = dict(multimem.FORBIDDING_ENV)

CASES = [
    ({}, "TW_ALLOW_MULTICAST"),                                         # not opted in
    ({"TW_ALLOW_MULTICAST": "0"}, "TW_ALLOW_MULTICAST"),
    ({"TW_ALLOW_MULTICAST": "yes"}, "TW_ALLOW_MULTICAST"),               # only "1" opts in
    (FORBID, "TW_ALLOW_MULTICAST"),                                     # the lab's environment as set
    ({"TW_ALLOW_MULTICAST": "1", "NCCL_NVLS_ENABLE": "0"}, "NCCL_NVLS_ENABLE=0"),
    ({"TW_ALLOW_MULTICAST": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}, "TORCH_SYMM_MEM_DISABLE_MULTICAST=1"),
    ({"TW_ALLOW_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}, "NVSHMEM_DISABLE_NVLS=1"),
    ({"TW_ALLOW_MULTICAST": "1", **FORBID}, "NCCL_NVLS_ENABLE=0"),      # the lab + an opt-in: still no
]


@pytest.mark.parametrize("env,needle", CASES)
def test_guard_refuses(env, needle):
    with pytest.raises(multimem.MulticastRefused, match=needle):
        multimem.check_multicast_allowed(env)


def test_guard_allows_only_explicit_opt_in_without_forbidding_vars():
    multimem.check_multicast_allowed({"TW_ALLOW_MULTICAST": "1"})       # returns, raises nothing
    multimem.check_multicast_allowed({"TW_ALLOW_MULTICAST": "1", "NCCL_NVLS_ENABLE": "1"})


@pytest.mark.parametrize("env", [e for e, _ in CASES])
def test_constructor_refuses_before_any_driver_import(env):
    """In a fresh interpreter with exactly `env`: MultimemComm(...) raises MulticastRefused and neither
    cuda-bindings nor CuPy has been imported (so no driver call can have happened)."""
    code = (
        "import sys\n"
        "from tw.comm.multimem import MultimemComm, MulticastRefused\n"
        "try:\n"
        "    MultimemComm(None, 8192, 128)\n"
        "except MulticastRefused:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('no refusal')\n"
        "bad = [m for m in ('cuda.bindings', 'cuda.bindings.driver', 'cupy') if m in sys.modules]\n"
        "raise SystemExit(f'imported {bad}' if bad else 0)\n")
    import os
    base = {k: v for k, v in os.environ.items() if k not in FORBID and k != "TW_ALLOW_MULTICAST"}
    proc = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _have_nvcc():
    try:
        from tw.runtime import kernels
        kernels.nvcc()
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _have_nvcc(), reason="nvcc not found")
def test_multimem_kernel_ptx_has_multimem_instructions():
    from tw.runtime import kernels
    ptx = kernels.compile("ar_norm_multimem", "sm_90a", kind="ptx").read_text()
    assert "multimem.ld_reduce.relaxed.sys.global.add.acc::f32.v4.bf16x2" in ptx
    assert "multimem.st.relaxed.sys.global.v4.f32" in ptx
    assert "multimem.red.release.sys.global.add.u32" in ptx
    # the bounded acquire spin of the barriers (tw::sync::wait_flag from cuda/peer_sync.cuh)
    assert "ld.acquire.sys.global.u32" in ptx
    assert "%globaltimer" in ptx
    # and ptxas accepts it for sm_90a (a cubin is produced)
    assert kernels.compile("ar_norm_multimem", "sm_90a").stat().st_size > 0
