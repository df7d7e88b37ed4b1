"""Stalled-peer watchdog: a rank that stays too long inside one named step ends the whole job and says
which rank(s) it was waiting for, instead of hanging in a collective forever.

    TW_TIMEOUT_S   seconds a rank may stay inside one step (default 300; 0 turns the watchdog off)

Mark the steps on every rank, in the same order (like collectives, except that they never block):

    dist.step("building model")                  # plain call: this step lasts until the next step()
    with dist.step("timing tokens=4096 nccl"):    # a block: on leaving it, the enclosing step resumes
        ...                                       #   (with a fresh clock)
    dist.step(None)                               # leave steps: no bound until the next step()

Only time inside a step is bounded; a rank outside any step (before the first one, or after
`step(None)`) is never timed out, so code that marks no steps behaves exactly as before.

How it works. `dist.init()` starts the watchdog (`start`), `dist.shutdown()` stops it. A daemon thread
on each rank wakes about once a second and publishes this rank's step counter (+1 on every step entry
and exit), step name, source location and a heartbeat into a small table shared by the ranks of one node
(tw/runtime/rank_table.py: a file in /dev/shm or the temp dir, mapped into every rank and unlinked at once).
When a rank has been inside one step longer than TW_TIMEOUT_S, its watchdog (the lowest such rank of the
node; the others stay quiet) prints one message,

    error: timed out after 300 s in step 'X' on rank 0: rank(s) 1 did not arrive (rank 1 last seen in step 'Y' 312 s ago ...)

and calls MPI_Abort, which ends every rank of the job. A peer "did not arrive" when its step counter is
behind, it is in another step, or its heartbeat is stale. Detection is done by the waiting ranks: a
stopped (SIGSTOP) or hung rank cannot run its own thread, but its heartbeat goes stale and its peers name
it. The thread runs while the main thread waits in any call that releases the GIL: mpi4py collectives,
CuPy's stream / device synchronize, NCCL calls, time.sleep.

Limits: ranks on other nodes are not in the table (the watchdogs of their own node report them); where
every rank of the node is in the same step and alive, the message says so rather than guessing who is late.
"""
from __future__ import annotations

import atexit
import os
import select
import signal
import sys
import threading
import time

from tw.runtime.rank_table import IDLE, IN_STEP, STOPPED, RankTable

TIMEOUT_ENV = "TW_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0
EXIT_CODE = 1  # the job's exit status after a timeout
INTERRUPT_GRACE_S = 2.0  # after Ctrl-C, how long the main thread has to raise KeyboardInterrupt itself

def timeout_from_env() -> float:
    """TW_TIMEOUT_S as seconds (0 = off); raises ValueError on a value that is not a number >= 0."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also rejects nan
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} must be a number of seconds >= 0 (0 turns the watchdog off)")
    return value


class Step:
    """What `step(name)` returns: the step has already begun; used as a context manager, leaving the
    block resumes the step that was current before."""

    def __init__(self, dog: "Watchdog | None", name: str | None, previous: str | None):
        self._dog, self.name, self._previous = dog, name, previous

    def __enter__(self) -> "Step":
        return self

    def __exit__(self, *exc) -> bool:
        if self._dog is not None:
            self._dog.set_step(self._previous)
        return False

    def __repr__(self) -> str:
        return f"Step({self.name!r})"


class Watchdog:
    def __init__(self, timeout_s: float, world_rank: int, table: RankTable | None):
        self.timeout_s, self.world_rank, self.table = timeout_s, world_rank, table
        self.poll_s = min(1.0, max(0.05, timeout_s / 10))
        self.stale_s = max(3 * self.poll_s, 2.0)  # a heartbeat older than this: the process is not running
        self._lock = threading.Lock()
        self._counter, self._name, self._since = 0, None, time.monotonic()
        self._main = threading.get_ident()
        self._stop = threading.Event()
        self._deferred_since = None
        self._wake_r = self._wake_w = None  # the signal wakeup pipe (see _watch_signals)
        self._sigint_at = None
        self._thread = threading.Thread(target=self._run, name="tw-watchdog", daemon=True)

    # --- main-thread side -------------------------------------------------------------------------
    def set_step(self, name: str | None) -> str | None:
        """Enter step `name` (None: leave steps); returns the step that was current."""
        with self._lock:
            previous = self._name
            self._counter += 1
            self._name, self._since = (None if name is None else str(name)), time.monotonic()
            if not self._stop.is_set():
                self._publish_locked(self._since)
        return previous

    # --- watchdog thread --------------------------------------------------------------------------
    def _where(self) -> str:
        """file:line of the innermost frame of the main thread that is not the standard library or a package."""
        frame = sys._current_frames().get(self._main)
        skip = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.__file__)}) + (__file__,)
        first = frame
        while frame is not None and (frame.f_code.co_filename.startswith(skip) or frame.f_code is _DIST_STEP_CODE):
            frame = frame.f_back
        frame = frame or first
        if frame is None:
            return ""
        path = frame.f_code.co_filename
        if path.startswith(os.getcwd() + os.sep):
            path = os.path.relpath(path)
        return f"{path}:{frame.f_lineno} in {frame.f_code.co_name}"

    def _publish_locked(self, now: float, state: int | None = None) -> None:
        if self.table is not None:
            state = state if state is not None else (IDLE if self._name is None else IN_STEP)
            self.table.write(self._counter, now, self._since, self.world_rank, state, self._name, self._where())

    def _wait(self) -> bool:
        """Sleep one poll interval (or until stop() or a signal); False once stopped."""
        if self._wake_r is None:
            return not self._stop.wait(self.poll_s)
        ready, _, _ = select.select([self._wake_r], [], [], self.poll_s)
        if ready:
            try:
                data = os.read(self._wake_r, 512)
            except OSError:
                data = b""
            if signal.SIGINT in data and self._sigint_at is None:
                self._sigint_at = time.monotonic()
        return not self._stop.is_set()

    def _run(self) -> None:
        while self._wait():
            now = time.monotonic()
            if self._sigint_at is not None and now - self._sigint_at > INTERRUPT_GRACE_S:
                # Ctrl-C arrived, but the main thread is still inside a blocking call (a collective or a
                # GPU sync waiting for a peer) and cannot raise KeyboardInterrupt: end the job from here.
                if self.world_rank == 0:
                    sys.stderr.write("interrupted\n")
                abort(130)
            with self._lock:
                self._publish_locked(now)
                counter, name, since = self._counter, self._name, self._since
            if name is None or now - since < self.timeout_s:
                self._deferred_since = None
                continue
            peers = self.table.peers() if self.table is not None else []
            if self._defer(peers, now):
                continue
            if self.table is not None and not self.table.claim():
                # Another rank of this node is reporting and aborting; if that somehow fails, end anyway.
                if now - since > self.timeout_s + 30:
                    os._exit(EXIT_CODE)
                continue
            self._fire(counter, name, since, peers, now)

    def _defer(self, peers: list[dict], now: float) -> bool:
        """Leave the report to a lower local rank that is alive and (about to be) timed out too, so that a
        node prints one message; but not for long, in case that rank is stuck in some other way."""
        lower = [p for p in peers if p["slot"] < self.table.slot and p["state"] == IN_STEP
                 and now - p["heartbeat"] <= self.stale_s and now - p["since"] >= self.timeout_s - 2 * self.poll_s]
        if not lower:
            return False
        self._deferred_since = self._deferred_since or now
        return now - self._deferred_since < 3 * self.poll_s + 2

    def message(self, counter: int, name: str, peers: list[dict], now: float) -> str:
        late, ahead = [], []
        for p in sorted(peers, key=lambda p: p["rank"]):
            if p["state"] == STOPPED:
                continue  # that rank finished (dist.shutdown) and is waiting for the others
            stale = now - p["heartbeat"] > self.stale_s
            at = f" at {p['where']}" if p["where"] else ""
            step = f"in step '{p['name']}'" if p["name"] is not None else "not in a step"
            if stale:
                late.append((p["rank"], f"rank {p['rank']} last seen {step} {now - p['heartbeat']:.0f} s ago{at}"))
            elif p["counter"] == counter and p["name"] == name:
                continue  # arrived: waiting in this step as well
            elif p["counter"] > counter:
                ahead.append(p["rank"])
            else:
                late.append((p["rank"], f"rank {p['rank']} {step} for {now - p['since']:.0f} s{at}"))
        head = f"error: timed out after {self.timeout_s:g} s in step '{name}' on rank {self.world_rank}"
        ranks = lambda rs: ", ".join(str(r) for r in rs)
        if self.table is None:
            why = "no view of the other ranks (the shared table could not be made)"
        elif late:
            why = f"rank(s) {ranks(r for r, _ in late)} did not arrive ({'; '.join(d for _, d in late)})"
        elif ahead:
            why = f"rank(s) {ranks(ahead)} already left this step: this rank is the one stuck, at {self._where()}"
        else:
            here = "; ".join(f"rank {r} at {w}" for r, w in
                             sorted([(self.world_rank, self._where())] + [(p["rank"], p["where"]) for p in peers]))
            why = (f"every rank of this node is in this step (a rank on another node is late, or the step is "
                   f"slow); {here}")
        return (f"{head}: {why}\nnote: {TIMEOUT_ENV}={self.timeout_s:g} bounds the time one step may take; "
                "raise it if the step is just slow (0 turns the watchdog off)")

    def _fire(self, counter, name, since, peers, now) -> None:
        try:
            msg = self.message(counter, name, peers, now)
        except Exception as e:  # never let a formatting problem keep the job hanging
            msg = f"error: timed out after {self.timeout_s:g} s in step '{name}' on rank {self.world_rank} ({e})"
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()
        abort(EXIT_CODE)

    def start(self) -> None:
        with self._lock:
            self._publish_locked(time.monotonic())
        self._watch_signals()
        self._thread.start()

    def _watch_signals(self) -> None:
        """Have Python's C-level signal handler also write to a pipe this thread reads (set_wakeup_fd):
        it sees a Ctrl-C even while the main thread is blocked in C. Only from the main thread, and only
        when nobody else (asyncio, ...) uses the wakeup fd."""
        if threading.current_thread() is not threading.main_thread():
            return
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        try:
            old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except (ValueError, OSError):
            old = None
        if old != -1:  # failed, or taken: put it back and do without
            if old is not None:
                signal.set_wakeup_fd(old)
            os.close(r)
            os.close(w)
            return
        self._wake_r, self._wake_w = r, w

    def stop(self) -> None:
        self._stop.set()
        if self._wake_w is not None:
            try:
                os.write(self._wake_w, b"\0")  # wake the thread now (0 is no signal)
            except OSError:
                pass
        if self._thread.is_alive() and threading.get_ident() != self._thread.ident:
            self._thread.join(timeout=5)
        if self._wake_w is not None and threading.current_thread() is threading.main_thread():
            try:
                old = signal.set_wakeup_fd(-1)
                if old != self._wake_w:  # someone replaced ours since: keep theirs
                    signal.set_wakeup_fd(old)
            except (ValueError, OSError):
                pass
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = None
        with self._lock:
            self._publish_locked(time.monotonic(), STOPPED)


def abort(code: int) -> None:
    """End the whole MPI job now with exit status `code`, without MPICH's 'Abort(...) on node ...' line."""
    try:
        from mpi4py import MPI
        if MPI.Is_initialized() and not MPI.Is_finalized():
            sys.stdout.flush()
            sys.stderr.flush()
            time.sleep(0.05)  # let the launcher forward what was just printed before the job is torn down
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            MPI.COMM_WORLD.Abort(code)
    finally:
        os._exit(code)


_DOG: Watchdog | None = None
_DIST_STEP_CODE = None  # tw.runtime.dist.step's code object: never the place to report




def start(comm=None, local_comm=None, timeout_s: float | None = None) -> Watchdog | None:
    """Start this rank's watchdog (collective over `local_comm`, the ranks of this node; dist.init calls it).
    timeout_s: None = TW_TIMEOUT_S. Returns None when the timeout is 0 (off). Idempotent."""
    global _DOG, _DIST_STEP_CODE
    if _DOG is not None:
        return _DOG
    dist = sys.modules.get("tw.runtime.dist")
    _DIST_STEP_CODE = getattr(getattr(dist, "step", None), "__code__", None)
    timeout_s = timeout_from_env() if timeout_s is None else float(timeout_s)
    if timeout_s <= 0:
        return None
    from mpi4py import MPI
    comm = comm or MPI.COMM_WORLD
    local_comm = local_comm or comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    table = RankTable.open_shared(local_comm)
    _DOG = Watchdog(timeout_s, comm.Get_rank(), table)
    _DOG.start()
    atexit.register(stop)  # before mpi4py's own atexit MPI_Finalize (atexit runs last-registered first)
    return _DOG


def stop() -> None:
    """Stop this rank's watchdog (dist.shutdown and the error hook call it); a no-op when none runs."""
    global _DOG
    dog, _DOG = _DOG, None
    if dog is not None:
        dog.stop()


def step(name: str | None) -> Step:
    """Begin step `name` on this rank (None: leave steps); use as a plain call or as a context manager.
    Without a running watchdog (TW_TIMEOUT_S=0, or before dist.init) it does nothing."""
    dog = _DOG
    if dog is None:
        return Step(None, name, None)
    return Step(dog, name, dog.set_step(name))


def current() -> str | None:
    """The name of this rank's current step (None outside steps or without a watchdog)."""
    dog = _DOG
    return dog._name if dog is not None else None
