"""The two-stream schedules' synchronization, checked on the CPU by replaying their event graph."""
from conftest import run_mpi


def test_tokenweave_and_finegrained_have_no_races():
    proc = run_mpi(2, ["-m", "tests.mpi_sync"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PASS tokenweave" in proc.stdout and "PASS finegrained4" in proc.stdout
