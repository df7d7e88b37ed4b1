"""GPU tests of the P2P transport: launches tests/mpi_p2p.py with mpirun on every GPU of the machine
(2, 4 or 8 ranks; $TW_TEST_RANKS overrides). Skipped without >= 2 GPUs. The launcher is $TW_MPIEXEC, else mpirun, else mpiexec on the PATH.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tw.dist import gpu_count

ROOT = Path(__file__).resolve().parent.parent


def _launcher():
    return os.environ.get("TW_MPIEXEC") or shutil.which("mpirun") or shutil.which("mpiexec")


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() < 2, reason="needs >= 2 GPUs")
@pytest.mark.skipif(_launcher() is None, reason="no mpirun/mpiexec (set TW_MPIEXEC)")
def test_p2p_all_gpus():
    ranks = int(os.environ.get("TW_TEST_RANKS", min(gpu_count(), 8)))
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "PYTHONUNBUFFERED": "1"}
    args = [] if os.environ.get("TW_P2P_FULL") else ["--quick"]
    cmd = [_launcher(), "-n", str(ranks), sys.executable, "-m", "tests.mpi_p2p", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "P2P TESTS PASSED" in proc.stdout, out[-6000:]
