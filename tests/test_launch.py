"""A new user's first hour: how jobs start and end (user errors, a stalled peer, Ctrl-C, BLAS threads,
no launcher). CPU jobs under the MPI launcher; each checks exit status, output and run time."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ROOT, mpiexec, printed_lines as _lines, run_mpi

MSG = "--thing must be positive, got -1"
LAUNCHER_NOISE = ("Traceback", "Abort(", "BAD TERMINATION")


def _timed_mpi(n, args, timeout, env=None):
    start = time.monotonic()
    proc = run_mpi(n, args, timeout=timeout, env=env)
    return proc, time.monotonic() - start


# --- 1. errors speak once ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["all", "preinit"])
def test_usage_error_on_every_rank_prints_one_line(mode):
    proc, took = _timed_mpi(2, ["-m", "tests.mpi_usage", mode], timeout=30)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert _lines(proc.stderr) == [f"error: {MSG}"], proc.stderr
    assert took < 10, took


@pytest.fixture(scope="module")
def lone_errors():
    """Both one-rank error jobs, started together (each mostly waits GRACE_S for the other rank)."""
    with ThreadPoolExecutor(2) as pool:
        yield {mode: pool.submit(_timed_mpi, 2, ["-m", "tests.mpi_usage", mode], 30) for mode in ("one", "zero")}


@pytest.mark.parametrize("mode", ["one", "zero"])
def test_usage_error_on_one_rank_still_ends_the_job(mode, lone_errors):
    """The other rank waits in a barrier: the job must end (not hang), with the message once."""
    proc, took = lone_errors[mode].result()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = _lines(proc.stderr)
    assert len(err) == 1 and err[0].endswith(f"error: {MSG}"), proc.stderr
    assert not any(noise in "\n".join(err) for noise in LAUNCHER_NOISE), proc.stderr
    assert took < 15, took


def test_internal_error_keeps_its_traceback_and_rank():
    proc, took = _timed_mpi(2, ["-m", "tests.mpi_usage", "internal"], timeout=30)
    assert proc.returncode != 0
    assert "[rank 1] Traceback" in proc.stderr and "[rank 1] RuntimeError: deliberate internal" in proc.stderr
    assert "[rank 0]" not in proc.stderr and "Abort(" not in "\n".join(_lines(proc.stderr)), proc.stderr
    assert took < 15, took


def test_argument_parser_help_once_with_defaults():
    proc, _ = _timed_mpi(2, ["-m", "tests.mpi_usage", "args", "--help"], timeout=30)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.count("usage:") == 1, out
    assert "(default: 64)" in out and "--quiet" in out and "(default: False)" in out, out
    assert "A test parser.\n  kept lines" in out, out  # the description keeps its line breaks


def test_argument_parser_error_once():
    proc, _ = _timed_mpi(2, ["-m", "tests.mpi_usage", "args", "--bad"], timeout=30)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("unrecognized arguments: --bad") == 1 and proc.stderr.count("usage:") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_tp_zero_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-c", "from tw.runtime import dist; dist.init(0, 'cpu')"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and _lines(proc.stderr) == ["error: --tp must be >= 1, got 0"], proc.stderr


# --- 2. stalled peer watchdog -----------------------------------------------------------------------

def _leftovers(marker: str) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


def _stall_job(mode: str, timeout: float, timeout_s: str = "3"):
    """Run tests/mpi_stall.py; afterwards no rank of it may be left (a stopped one would be)."""
    marker = f"tw-test-{uuid.uuid4().hex}"
    try:
        return _timed_mpi(2, ["-m", "tests.mpi_stall", mode, marker], timeout=timeout,
                          env={"TW_TIMEOUT_S": timeout_s})
    finally:
        time.sleep(0.5)
        left = _leftovers(marker)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        assert not left, f"ranks left running: {left}"


@pytest.fixture(scope="module")
def stall_jobs():
    """The four stall jobs, started together on first use: each mostly waits (a rank asleep or stopped,
    the watchdog counting down, a pause), so together they take as long as the longest (~8 s) instead
    of the sum (~19 s). {mode: future of (proc, seconds)}."""
    with ThreadPoolExecutor(4) as pool:
        yield {mode: pool.submit(_stall_job, mode, timeout=40) for mode in ("ok", "stop", "sleep", "same")}


@pytest.mark.parametrize("mode,where", [("stop", "last seen in step 'slow work on rank 1'"),
                                        ("sleep", "in step 'slow work on rank 1' for")])
def test_watchdog_names_the_rank_that_did_not_arrive(mode, where, stall_jobs):
    proc, took = stall_jobs[mode].result()
    assert proc.returncode != 0, proc.stdout + proc.stderr
    err = proc.stderr
    assert "error: timed out after 3 s in step 'waiting for rank 1' on rank 0: rank(s) 1 did not arrive" in err, err
    assert where in err and err.count("error:") == 1, err
    assert not any(noise in "\n".join(_lines(err)) for noise in LAUNCHER_NOISE), err
    assert took < 20, took


def test_watchdog_in_a_step_every_rank_is_in_says_where_each_rank_is(stall_jobs):
    proc, took = stall_jobs["same"].result()
    err = proc.stderr
    assert proc.returncode != 0 and err.count("error:") == 1, err
    assert "in step 'exchange' on rank 0: every rank of this node is in this step" in err, err
    assert "rank 1 at tests/mpi_stall.py:" in err, err  # the sleeping rank's line, beside the waiters'
    assert took < 20, took


def test_watchdog_spares_steps_within_the_bound(stall_jobs):
    """Steps of 1.5 s (rank 0 waiting for rank 1) and 4 s outside any step, with TW_TIMEOUT_S=3."""
    proc, took = stall_jobs["ok"].result()
    assert proc.returncode == 0 and "done" in proc.stdout, proc.stdout + proc.stderr
    assert "timed out" not in proc.stderr, proc.stderr
    assert took > 5  # the job did outlive TW_TIMEOUT_S


def _open_mpi(launcher: str) -> bool:
    version = subprocess.run([launcher, "--version"], capture_output=True, text=True).stdout
    return any(name in version for name in ("Open MPI", "OpenRTE", "open-mpi"))


# --- 3. Ctrl-C --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["interrupt", "interrupt-blocked"])
def test_ctrl_c_ends_every_rank_with_one_line(mode):
    launcher = mpiexec()
    if launcher is None:
        pytest.skip("no mpiexec/mpirun (pip install mpich)")
    if _open_mpi(launcher):
        pytest.skip("Open MPI's mpirun does not forward SIGINT: it ends the ranks itself (SIGTERM; exit 1, quietly)")
    marker = f"tw-test-{uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TW_TIMEOUT_S": "60"}
    start = time.monotonic()
    proc = subprocess.Popen([launcher, "-n", "2", sys.executable, "-m", "tests.mpi_stall", mode, marker], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # every rank is now inside the sleep (or the blocking MPI call)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does to the launcher; it forwards SIGINT to the ranks
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _leftovers(marker):
            os.kill(pid, signal.SIGKILL)
    took = time.monotonic() - start
    assert proc.returncode == 130, out + err
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err, out + err
    assert _lines(err) == ["interrupted"], err  # the launcher's own Ctrl-C note goes to stdout
    assert took < 15, took


# --- 4. one BLAS thread per rank --------------------------------------------------------------------

THREADS_PROBE = """
import os, sys
first = sys.argv[1]
if first == "numpy":
    import numpy
import tw, numpy
report = [os.environ.get("OPENBLAS_NUM_THREADS", "unset")]
try:
    from threadpoolctl import threadpool_info
    report += [str(i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"]
except ImportError:
    pass
from mpi4py import MPI  # rank 0 prints every rank's report: a rank that exits without MPI may lose its output
reports = MPI.COMM_WORLD.gather(report, root=0)
if MPI.COMM_WORLD.Get_rank() == 0:
    for r in reports:
        print("threads", " ".join(r), flush=True)
"""


def _thread_reports(proc) -> list[list[str]]:
    assert proc.returncode == 0, proc.stderr
    return [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("threads")]


@pytest.mark.parametrize("first", ["tw", "numpy"])
def test_one_blas_thread_per_rank(first, monkeypatch):
    if first == "numpy":
        pytest.importorskip("threadpoolctl")  # NumPy's BLAS loaded first: only threadpoolctl can limit it
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    reports = _thread_reports(run_mpi(2, ["-c", THREADS_PROBE, first], timeout=30))
    assert len(reports) == 2, reports
    for report in reports:
        assert report[0] == "1" and all(n == "1" for n in report[1:]), reports


def test_blas_threads_the_user_set_are_kept(monkeypatch):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    reports = _thread_reports(run_mpi(2, ["-c", THREADS_PROBE, "tw"], timeout=30, env={"OPENBLAS_NUM_THREADS": "2"}))
    assert [r[0] for r in reports] == ["2", "2"], reports


# --- 5. without a launcher --------------------------------------------------------------------------

def test_no_launcher_says_so_once():
    code = "from tw.runtime import dist; w = dist.init(None, 'cpu'); dist.init(None, 'cpu'); print('tp', w.tp_size)"
    launcher_vars = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_", "MV2_COMM_WORLD_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher_vars)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "tp 1" in proc.stdout, proc.stderr
    assert _lines(proc.stderr) == ["note: started without mpirun/mpiexec: running TP=1 on one process; "
                                   "start N ranks with 'mpiexec -n N python -m ...'"], proc.stderr


def test_one_rank_under_the_launcher_has_no_note():
    proc = run_mpi(1, ["-c", "from tw.runtime import dist; dist.init(None, 'cpu'); print('ok')"], timeout=30)
    assert proc.returncode == 0 and "ok" in proc.stdout and "note:" not in proc.stderr, proc.stderr
