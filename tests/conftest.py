"""Shared test helpers: launching MPI jobs and skipping GPU tests on machines without one."""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ERR_OUT = "/tmp/tw-test-err.jsonl"  # --out of runs that must stop at a user error (never written)


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
    if n > len(os.sched_getaffinity(0)):
        # More ranks than cores: MPICH's waiting ranks sleep briefly instead of spinning, so the ranks with
        # work get the cores (the 8-rank MoE check on 2 cores: 5.7 -> 2.8 s of strategies).
        full_env.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")
    extra = ["--oversubscribe"] if _is_openmpi(launcher) else []
    cmd = [launcher, *extra, "-n", str(n), sys.executable, *args]
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def printed_lines(text: str) -> list[str]:
    """What a job printed, without the launcher's own notes: Open MPI's boxed notices (between lines of
    dashes: a rank exited nonzero, MPI_ABORT was invoked), which it prints itself and nothing can
    silence, and MPICH's `[mpiexec@host]` lines."""
    lines, boxed = [], False
    for line in text.splitlines():
        if set(line.strip()) == {"-"}:
            boxed = not boxed
        elif not boxed and line.strip() and not line.startswith("[mpiexec@"):
            lines.append(line)
    return lines


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


# --- flag checks in this process --------------------------------------------------------------------

class OneProcessComm:
    """An MPI communicator of `size` ranks as its rank 0 sees it, in this one process: a collective
    returns this rank's own value, which is what every rank gets when the ranks agree. The flag checks
    run identically on every rank before anything is built, so they do agree."""

    def __init__(self, size: int):
        self.size = size

    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return self.size

    def allreduce(self, value, op=None):
        return value

    def bcast(self, value, root=0):
        return value

    def Barrier(self) -> None:
        pass


def fake_world(tp: int = 2, ranks: int | None = None, gpu: bool = False, sm_count: int = 132):
    """Rank 0's tw.runtime.dist.World of a job of `ranks` (default tp) ranks in TP groups of tp, without
    MPI: the CPU path, or (gpu=True) an H200's facts for checks that read them (nothing runs on it)."""
    from tw.runtime import dist
    ranks = ranks or tp
    return dist.World(comm=OneProcessComm(ranks), local_comm=OneProcessComm(ranks), tp_comm=OneProcessComm(tp),
                      device="gpu" if gpu else "cpu", device_id=0 if gpu else -1,
                      gpu_name="NVIDIA H200" if gpu else "none", sm_count=sm_count if gpu else 0)


def usage_error(main, argv: list[str], world=None) -> str:
    """The message of the UsageError that an experiment's `main(argv)` raises, run in this process on
    `world` (default: the CPU world of `mpiexec -n 2`) instead of an MPI job's. What an MPI job makes of
    the error (`error: <message>` once, exit 2, no traceback) is tested end to end in test_launch.py
    and by a few runs in test_first_hour.py."""
    from unittest import mock

    from tw.runtime import dist
    world = world or fake_world()
    with mock.patch.object(dist, "init", lambda tp=None, device="auto": world):
        with pytest.raises(dist.UsageError) as e:
            main(argv)
    return str(e.value)


def help_text(module: str, monkeypatch, capsys) -> str:
    """`python -m experiments.<module> --help` as an 80-column terminal shows it (argparse reads COLUMNS)."""
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"experiments.{module}").parse_args(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out
