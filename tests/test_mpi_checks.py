"""tests/mpi_checks.py, the helpers of the multi-rank GPU test scripts, on one CPU process."""
import types

import numpy as np
import pytest
from mpi4py import MPI

from tests import mpi_checks


@pytest.fixture
def world(capsys):
    mpi_checks.FAILS.clear()
    yield types.SimpleNamespace(tp_comm=MPI.COMM_SELF, tp_rank=0, print0=print)
    mpi_checks.FAILS.clear()


def test_sections_collect_failures_and_exceptions_and_report_them(world, capsys):
    assert mpi_checks.section(world, "fine", lambda: 7) == 7
    mpi_checks.section(world, "wrong", lambda: mpi_checks.expect(False, "two is not three"))
    assert mpi_checks.section(world, "crash", lambda: 1 / 0) is None
    ref = np.ones(10)
    mpi_checks.section(world, "close", mpi_checks.rel_err, ref * (1 + 1e-3), ref, "close")
    mpi_checks.section(world, "far", mpi_checks.rel_err, ref * 1.5, ref, "far")
    out = capsys.readouterr().out
    assert "  fine: ok (" in out and "  wrong: 1 FAILURES (" in out and "  crash: 1 FAILURES (" in out
    assert "  close: ok (" in out and "  far: 1 FAILURES (" in out
    assert mpi_checks.report(world, "X") == 1
    out = capsys.readouterr().out
    assert "FAIL [rank 0] two is not three" in out and "ZeroDivisionError" in out and "X TESTS FAILED: 3" in out


def test_a_clean_run_passes(world, capsys):
    mpi_checks.section(world, "fine", mpi_checks.same_on_all_ranks, world, np.arange(4), "arange")
    assert mpi_checks.report(world, "Y") == 0 and "Y TESTS PASSED" in capsys.readouterr().out


def test_user_error_cases_must_raise_a_clear_value_or_type_error(world):
    def bad(exc, msg):
        def fn():
            raise exc(msg)
        return fn
    mpi_checks.expect_user_errors({"good": bad(ValueError, "--x must be >= 1, got 0"), "terse": bad(TypeError, "no"),
                                   "wrong kind": bad(RuntimeError, "boom"), "silent": lambda: None})
    assert [f.split("'")[1] for f in mpi_checks.FAILS] == ["terse", "wrong kind", "silent"]

