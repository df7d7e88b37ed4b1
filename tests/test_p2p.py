"""GPU tests of the P2P transport: launches tests/mpi_p2p.py with mpirun on every GPU of the machine
(2, 4 or 8 ranks; $TW_TEST_RANKS overrides). Skipped without >= 2 GPUs. The launcher is $TW_MPIEXEC, else mpirun, else mpiexec on the PATH.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tw.runtime.dist import gpu_count

ROOT = Path(__file__).resolve().parent.parent


def _launcher():
    return os.environ.get("TW_MPIEXEC") or shutil.which("mpirun") or shutil.which("mpiexec")


def _ranks_and_env():
    """Every GPU of the machine (one rank each), or with one GPU 2 and 4 ranks sharing it (TW_SHARE_GPU=1:
    CUDA IPC works across processes on one GPU; correctness only)."""
    n = gpu_count()
    if n >= 2:
        return [(int(os.environ.get("TW_TEST_RANKS", min(n, 8))), {})]
    return [(2, {"TW_SHARE_GPU": "1"}), (4, {"TW_SHARE_GPU": "1"})]


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() < 1, reason="needs a GPU")
@pytest.mark.skipif(_launcher() is None, reason="no mpirun/mpiexec (set TW_MPIEXEC)")
@pytest.mark.parametrize("ranks,extra_env", _ranks_and_env() if gpu_count() else [(2, {})])
def test_p2p_all_gpus(ranks, extra_env):
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "PYTHONUNBUFFERED": "1", **extra_env}
    args = [] if os.environ.get("TW_P2P_FULL") else ["--quick"]
    extra = ["-x", "TW_SHARE_GPU"] if extra_env and "OpenRTE" in subprocess.run(
        [_launcher(), "--version"], capture_output=True, text=True).stdout else []
    oversub = ["--oversubscribe"] if extra else []
    cmd = [_launcher(), *oversub, *extra, "-n", str(ranks), sys.executable, "-m", "tests.mpi_p2p", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "P2P TESTS PASSED" in proc.stdout, out[-6000:]
