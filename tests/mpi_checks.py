"""What the multi-rank GPU test scripts (tests/mpi_p2p.py, tests/mpi_ce.py) share: failures collected on
each rank (expect, rel_err, same_on_all_ranks) instead of raised, named sections that report ok or their
failure count with the time they took, and one report on rank 0 at the end. A failed check never stops a
rank early, so every rank still joins every collective and the report names every failure."""
from __future__ import annotations

import hashlib
import time
import traceback

import numpy as np

TOL = 1e-2   # relative norm error of a bf16 result against its float64 reference (tests/mpi_p2p.py says why)
FAILS: list[str] = []   # this rank's failures


def expect(cond: bool, what: str) -> None:
    if not cond:
        FAILS.append(what)


def rel_err(got, ref, what: str, tol: float = TOL) -> None:
    got = np.asarray(got, dtype=np.float64)
    diff = np.abs(got - ref)
    err = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)
    if not err <= tol:
        FAILS.append(f"{what}: relative norm error {err:.3e} > {tol} (max abs err {diff.max():.3e}, "
                     f"mean abs err {diff.mean():.3e}, nan={np.isnan(got).sum()})")


def same_on_all_ranks(world, x, what: str) -> None:
    digest = hashlib.sha256(np.ascontiguousarray(x).view(np.uint8).tobytes()).hexdigest()  # hash() is salted
    expect(len(set(world.tp_comm.allgather(digest))) == 1, f"{what}: differs between ranks")


def expect_user_errors(cases: dict) -> None:
    """Each callable of `cases` ({name: fn}) must raise ValueError or TypeError with a message that says
    something; any other outcome is a failure named after its case."""
    for name, fn in cases.items():
        try:
            fn()
        except (ValueError, TypeError) as e:
            expect(len(str(e)) > 10, f"bad input '{name}': error message too short: {e!r}")
        except Exception as e:  # noqa: BLE001
            FAILS.append(f"bad input '{name}': raised {type(e).__name__} instead of ValueError/TypeError: {e}")
        else:
            FAILS.append(f"bad input '{name}': no error raised")


def section(world, name: str, fn, *args, **kwargs):
    """fn(*args, **kwargs) as one named section: an exception is this rank's failure; rank 0 prints ok
    or the failures of all ranks, and the seconds it took. Returns fn's result (None after an exception)."""
    before, t0 = len(FAILS), time.perf_counter()
    try:
        result = fn(*args, **kwargs)
    except Exception:  # noqa: BLE001 - a crash is a failure of this rank, reported below
        FAILS.append(f"{name}: exception\n{traceback.format_exc()}")
        result = None
    failed = world.tp_comm.allreduce(len(FAILS) - before)
    world.print0(f"  {name}: {'ok' if failed == 0 else f'{failed} FAILURES'} ({time.perf_counter() - t0:.1f} s)")
    return result


def report(world, label: str) -> int:
    """Every rank's failures printed on rank 0, then '<label> TESTS PASSED' or '... FAILED'; returns the
    job's exit code (the same on every rank)."""
    all_fails = world.tp_comm.gather(FAILS, root=0)
    code = 0
    if world.tp_rank == 0:
        flat = [f"[rank {r}] {f}" for r, fs in enumerate(all_fails) for f in fs]
        for f in flat[:60]:
            print("FAIL", f)
        print(f"{label} TESTS PASSED" if not flat else f"{label} TESTS FAILED: {len(flat)} failures", flush=True)
        code = 0 if not flat else 1
    return world.tp_comm.bcast(code, root=0)
