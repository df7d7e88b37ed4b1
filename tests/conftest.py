"""Shared test helpers: launching MPI jobs and skipping GPU tests on machines without one."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def mpiexec() -> str | None:
    """The MPI launcher: $TW_MPIEXEC, else the one installed beside this Python (the mpich wheel),
    else mpiexec / mpirun on the PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    return (os.environ.get("TW_MPIEXEC") or (str(beside) if beside.exists() else None)
            or shutil.which("mpiexec") or shutil.which("mpirun"))


def run_mpi(n: int, args: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python <args>` on n MPI ranks from the repo root; returns the finished process."""
    launcher = mpiexec()
    if launcher is None:
        pytest.skip("no mpiexec/mpirun (pip install mpich)")
    full_env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                "PYTHONUNBUFFERED": "1", **(env or {})}
    extra = ["--oversubscribe"] if _is_openmpi(launcher) else []
    cmd = [launcher, *extra, "-n", str(n), sys.executable, *args]
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def _is_openmpi(launcher: str) -> bool:
    try:
        out = subprocess.run([launcher, "--version"], capture_output=True, text=True).stdout
        return "Open MPI" in out or "OpenRTE" in out
    except OSError:
        return False


def gpus() -> int:
    from tw.runtime.dist import gpu_count
    return gpu_count()


def requires_gpus(n: int = 1):
    """The one way GPU tests are marked: `gpu` (select with -m gpu) and skipped with fewer than n GPUs."""
    def mark(test):
        test = pytest.mark.gpu(test)
        return pytest.mark.skipif(gpus() < n, reason=f"needs {n} CUDA GPU{'s' if n > 1 else ''}")(test)
    return mark


requires_gpu = requires_gpus(1)
