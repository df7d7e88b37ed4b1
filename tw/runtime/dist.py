"""The one MPI / device / NCCL bootstrap.

One MPI rank per GPU. The tensor-parallel (TP) group is made of ranks of one node (MPI
`COMM_TYPE_SHARED`); a node's ranks form `local_size / tp` TP groups, and all TP groups in the job are
data-parallel (DP) replicas. Each rank uses GPU `local_rank`.

How a job ends when something goes wrong (the hook that `install_abort_hook` puts on sys.excepthook,
when this module is imported and again in init()):
- a `UsageError` (the user's mistake: bad arguments, a job shape that cannot work) prints
  `error: <message>` once (world rank 0), no traceback, and every rank exits with status 2. User errors
  are meant to be found identically on every rank; when they are (the ranks meet within GRACE_S), the
  job ends cleanly (MPI_Finalize, exit 2). A rank that raised alone prints `[rank R] error: ...` after
  GRACE_S and aborts the job, so the others never wait for it.
- Ctrl-C (KeyboardInterrupt) prints `interrupted` once and every rank exits with status 130.
- any other exception prints `[rank R] <traceback>` and aborts the whole MPI job, so one failing rank
  never leaves the others waiting in a collective (a plain one-process run without a launcher prints
  Python's usual traceback).
- a rank stuck in one `step()` longer than TW_TIMEOUT_S seconds ends the job, naming the rank(s) it
  was waiting for (tw.watchdog).
MPI_Abort here runs with stderr closed, so MPICH adds no "Abort(...) on node ..." line to the message.
"""
from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
import time
import traceback
from dataclasses import dataclass, field

from mpi4py import MPI

from tw import launched_by_mpi, launcher_rank
from tw.runtime import watchdog

GRACE_S = 2.0  # how long a rank that raised a UsageError waits for the others to raise it too


class UsageError(Exception):
    """The user's mistake (bad arguments, a job shape that cannot work): `error: <message>` once, exit 2."""


class SharedGpuError(RuntimeError):
    """Something that cannot run with several ranks on one GPU (TW_SHARE_GPU=1), e.g. NCCL."""


class LaunchError(UsageError, RuntimeError):
    """The job was started with a shape that cannot work (ranks, GPUs, TP). A UsageError."""


_ERR_COMM = None  # a duplicate of COMM_WORLD that only the error hook uses (made by init())


def _rank_size() -> tuple[int, int]:
    if MPI.Is_initialized() and not MPI.Is_finalized():
        return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    return launcher_rank(), 1


def _say(line: str) -> None:
    sys.stderr.write(line.rstrip("\n") + "\n")
    sys.stderr.flush()


def _all_raised(grace_s: float) -> bool:
    """Did every rank reach the error hook (within grace_s)? Meets on the hook's own communicator, so
    it can never be mistaken for a collective that the program itself is in."""
    if _ERR_COMM is None or MPI.Is_finalized():
        return False
    req = _ERR_COMM.Ibarrier()
    deadline = time.monotonic() + grace_s
    while not req.Test():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _exit_together(code: int):
    """Every rank is exiting with `code`: finalize and exit as dist.shutdown does (no process-manager kill)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()
    if _GPU_IN_USE:
        os._exit(code)
    sys.exit(code)


def _handle_uncaught(exc_type, exc, tb) -> None:
    watchdog.stop()
    rank, size = _rank_size()
    if issubclass(exc_type, (KeyboardInterrupt, UsageError)):
        interrupted = issubclass(exc_type, KeyboardInterrupt)
        code, line = (130, "interrupted") if interrupted else (2, f"error: {exc}")
        if rank == 0:
            _say(line)
        if size == 1 or _all_raised(0.5 if interrupted else GRACE_S):
            _exit_together(code)
        # Not every rank raised (or init() has not made the hook's communicator yet): make sure the job
        # ends. Rank 0 has printed; another rank waits first, since rank 0 may have raised too and its
        # abort would end this rank here without a second message; after Ctrl-C it stays quiet.
        if rank != 0:
            if interrupted:  # rank 0 is blocked in C (its watchdog then ends the job, saying so) or exiting
                time.sleep(watchdog.INTERRUPT_GRACE_S + 1.5)
            else:
                if _ERR_COMM is None:
                    time.sleep(GRACE_S)
                _say(f"[rank {rank}] {line}")
        watchdog.abort(code)
    if size == 1 and not launched_by_mpi():  # a plain one-process run: Python's own traceback, exit 1
        sys.__excepthook__(exc_type, exc, tb)
        return
    msg = "".join(traceback.format_exception(exc_type, exc, tb))
    sys.stderr.write("".join(f"[rank {rank}] {line}\n" for line in msg.rstrip().splitlines()))
    sys.stderr.flush()
    if size > 1:
        watchdog.abort(1)
    sys.exit(1)


def _abort_on_uncaught(exc_type, exc, tb):
    try:
        _handle_uncaught(exc_type, exc, tb)
    except SystemExit:
        raise
    except KeyboardInterrupt:  # Ctrl-C again while the hook waits
        os._exit(130)
    except BaseException:  # the hook itself failed (MPI in a bad state, ...): still end, never hang
        try:
            traceback.print_exception(exc_type, exc, tb)
            sys.stderr.flush()
        finally:
            os._exit(1)


def install_abort_hook() -> None:
    sys.excepthook = _abort_on_uncaught


install_abort_hook()  # already at import: user errors are often found before init()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's line breaks and shows every option's default (also of options
    given no help text, which argparse would list bare)."""

    def _format_action(self, action):
        if not action.help and action.option_strings and action.default is not argparse.SUPPRESS:
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        if "(default" in (action.help or ""):  # it already says its default (e.g. one that depends on the device)
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for SPMD programs: usage, errors and --help are printed by world rank 0 only (read from
    the launcher's environment, so it works before MPI is initialised); every rank still exits with
    argparse's status (2 on a bad argument, 0 after --help). Options without a help text still show
    their default in --help (HelpFormatter)."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def _print_message(self, message, file=None):
        if _rank_size()[0] == 0:
            super()._print_message(message, file)


def step(name: str | None) -> watchdog.Step:
    """Mark the start of step `name` on this rank, for the stalled-peer watchdog (TW_TIMEOUT_S bounds the
    time one step may take; see tw.watchdog). A plain call (the step lasts until the next one) or a
    context manager (leaving it resumes the enclosing step). step(None) leaves steps (no bound)."""
    return watchdog.step(name)


def gpu_count() -> int:
    """Number of visible CUDA GPUs; 0 when CuPy or a driver is missing."""
    try:
        import cupy as cp
        return cp.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


@dataclass
class World:
    comm: MPI.Comm          # all ranks
    local_comm: MPI.Comm    # ranks of this node
    tp_comm: MPI.Comm       # this rank's TP group
    device: str             # "gpu" or "cpu"
    device_id: int          # CUDA device index (local rank) or -1 on CPU
    gpu_name: str = "none"  # e.g. "NVIDIA H200"; "none" on the CPU
    sm_count: int = 0       # streaming multiprocessors of this rank's GPU; 0 on the CPU
    shared_gpu: bool = False  # TW_SHARE_GPU=1 put several ranks on one GPU (correctness runs only)
    _nccl: object = field(default=None, repr=False)

    rank = property(lambda self: self.comm.Get_rank())
    size = property(lambda self: self.comm.Get_size())
    local_rank = property(lambda self: self.local_comm.Get_rank())
    local_size = property(lambda self: self.local_comm.Get_size())
    tp_rank = property(lambda self: self.tp_comm.Get_rank())
    tp_size = property(lambda self: self.tp_comm.Get_size())
    dp_size = property(lambda self: self.size // self.tp_size)
    dp_rank = property(lambda self: self.rank // self.tp_size)

    @property
    def is_gpu(self) -> bool:
        return self.device == "gpu"

    @property
    def gpu_tag(self) -> str:
        """The GPU as file names and tuned-choice keys spell it: "NVIDIA_H200"; "cpu" on the CPU."""
        return self.gpu_name.replace(" ", "_") if self.is_gpu else "cpu"

    def new_stream(self):
        """A non-blocking CUDA stream on this rank's GPU (None on the CPU, where ops ignore streams)."""
        if not self.is_gpu:
            return None
        import cupy as cp
        return cp.cuda.Stream(non_blocking=True)

    def print0(self, *args, **kwargs) -> None:
        """Print on world rank 0 only (the one place that prints)."""
        if self.rank == 0:
            print(*args, **kwargs, flush=True)

    @property
    def nccl(self):
        """NCCL communicator over the TP group (created on first use)."""
        if not self.is_gpu:
            raise RuntimeError("NCCL needs the GPU device; this world runs on the CPU")
        if self.shared_gpu:
            raise SharedGpuError("NCCL refuses two ranks on one GPU (TW_SHARE_GPU=1): the nccl strategy and "
                                 "transport cannot run in this mode; use p2p (or ce), or one rank per GPU")
        if self._nccl is None:
            from cupy.cuda import nccl
            uid = nccl.get_unique_id() if self.tp_rank == 0 else None
            uid = self.tp_comm.bcast(uid, root=0)
            self._nccl = nccl.NcclCommunicator(self.tp_size, uid, self.tp_rank)
        return self._nccl

    def sub(self, tp: int) -> "World":
        """A world over the same ranks with a smaller TP degree (e.g. tp=1 to compare TP=2 with TP=1)."""
        sub = _make_world(self.comm, self.local_comm, tp, self.device, self.device_id)
        sub.shared_gpu = self.shared_gpu
        return sub


def gpu_facts(device_id: int) -> tuple[str, int]:
    """(name, SM count) of CUDA device `device_id` (tw.runtime.kernels.device_facts asks the driver)."""
    from tw.runtime.kernels import device_facts
    return device_facts(device_id)


def _make_world(comm, local_comm, tp, device, device_id) -> World:
    local_rank, local_size = local_comm.Get_rank(), local_comm.Get_size()
    if tp < 1 or local_size % tp != 0:
        raise LaunchError(f"--tp {tp} must divide the {local_size} ranks on this node "
                          f"(TP groups are made of ranks of one node); launch with mpirun -n {tp} "
                          f"or pick a TP degree that divides {local_size}")
    tp_comm = local_comm.Split(color=local_rank // tp, key=local_rank)
    name, sms = gpu_facts(device_id) if device == "gpu" else ("none", 0)
    return World(comm=comm, local_comm=local_comm, tp_comm=tp_comm, device=device, device_id=device_id,
                 gpu_name=name, sm_count=sms)


def init(tp: int | None = None, device: str = "auto") -> World:
    """Set up the MPI world, the TP group and this rank's device, and start the stalled-peer watchdog
    (TW_TIMEOUT_S, see tw.watchdog). Collective: every rank calls it.

    tp: TP degree; None = every rank of the node in one group. device: "auto" (GPU if one is usable,
    else CPU), "gpu" or "cpu". A bad tp / device / job shape raises UsageError (`error: ...` once, exit 2).
    """
    global _ERR_COMM
    install_abort_hook()
    comm = MPI.COMM_WORLD
    if _ERR_COMM is None:
        _ERR_COMM = comm.Dup()  # first: the hook needs it to tell "every rank raised" for the errors below
    if device not in ("auto", "gpu", "cpu"):
        raise UsageError(f"--device must be auto, gpu or cpu, got {device!r}")
    if tp is not None and tp < 1:
        raise UsageError(f"--tp must be >= 1, got {tp}")
    try:
        watchdog.timeout_from_env()
    except ValueError as e:
        raise UsageError(str(e)) from None
    local_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    watchdog.start(comm, local_comm)
    local_rank, local_size = local_comm.Get_rank(), local_comm.Get_size()
    tp = local_size if tp is None else tp
    if tp > local_size:
        raise LaunchError(f"--tp {tp} needs {tp} MPI ranks on one node, but this node has {local_size}: "
                          f"launch with mpirun -n {tp} python -m ... (one rank per GPU)")

    ngpu = gpu_count() if device != "cpu" else 0
    if device == "gpu" and ngpu == 0:
        raise LaunchError("--device gpu but no CUDA GPU is usable here (CuPy missing or no driver); "
                          "use --device cpu or auto")
    use_gpu = device == "gpu" or (device == "auto" and ngpu > 0)
    device_id = -1
    if use_gpu:
        # Every rank must agree, or the others would wait forever for a rank that raised alone.
        share = env_flag("TW_SHARE_GPU")
        too_few = local_size > ngpu and not share
        if local_comm.allreduce(too_few, op=MPI.LOR):
            raise LaunchError(f"{local_size} ranks on this node but only {ngpu} GPU(s) visible: "
                              "one rank per GPU; use mpirun -n <number of GPUs> (or TW_SHARE_GPU=1 to test "
                              "multi-rank paths on fewer GPUs: correctness only, timings meaningless)")
        import cupy as cp
        device_id = local_rank % ngpu  # TW_SHARE_GPU=1: ranks share GPUs round-robin
        cp.cuda.Device(device_id).use()
        global _GPU_IN_USE
        _GPU_IN_USE = True
    if comm.Get_size() == 1 and not launched_by_mpi():
        _note_no_launcher()
    world = _make_world(comm, local_comm, tp, "gpu" if use_gpu else "cpu", device_id)
    world.shared_gpu = use_gpu and local_size > ngpu
    if world.shared_gpu and world.rank == 0:
        _say(f"note: TW_SHARE_GPU=1: {local_size} ranks share {ngpu} GPU(s): for correctness only, every timing "
             "is meaningless (rows say shared_gpu: true); NCCL refuses two ranks on one GPU")
    return world


_NOTED_NO_LAUNCHER = False


def _note_no_launcher() -> None:
    """Say once that a process started without mpiexec is a one-rank job, and how to start more ranks."""
    global _NOTED_NO_LAUNCHER
    if _NOTED_NO_LAUNCHER:
        return
    _NOTED_NO_LAUNCHER = True
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        name = spec.name[:-len(".__main__")] if spec.name.endswith(".__main__") else spec.name
        cmd = f"python -m {name} ..."
    elif getattr(main, "__file__", None):
        rel = os.path.relpath(main.__file__)
        cmd = f"python {main.__file__ if rel.startswith('..') else rel} ..."
    else:
        cmd = "python -m ..."
    _say(f"note: started without mpirun/mpiexec: running TP=1 on one process; "
         f"start N ranks with 'mpiexec -n N {cmd}'")


_GPU_IN_USE = False  # set by init() when this rank drives a GPU


def shutdown(code: int = 0) -> None:
    """End this rank now: flush, wait for every rank, stop the watchdog, finalize MPI, exit.

    On a GPU, exit without Python's finalizers (os._exit): interpreter teardown destroys CUDA graphs,
    IPC mappings and NCCL communicators in an arbitrary order on each rank; with graphs holding NCCL
    kernels that was seen to hang at exit on the lab machine (the run had finished, mpirun never
    returned). Skipping those finalizers is safe there: the driver reclaims everything. On the CPU,
    exit normally: with MPICH, os._exit right after MPI_Finalize skips the C exit handlers and the
    process manager then killed a rank (SIGKILL, exit code 9) in ~1 of 4 successful 4-rank runs.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    MPI.COMM_WORLD.Barrier()
    watchdog.stop()
    MPI.Finalize()
    if _GPU_IN_USE:
        os._exit(code)
    sys.exit(code)


@functools.lru_cache(maxsize=None)
def versions() -> dict:
    """Versions of what the numbers depend on (for result metadata)."""
    import numpy as np
    import mpi4py
    v = {"python": sys.version.split()[0], "numpy": np.__version__, "mpi4py": mpi4py.__version__,
         "mpi": MPI.Get_library_version().replace("\x00", "").splitlines()[0].strip()}
    try:
        import cupy as cp
        v["cupy"] = cp.__version__
        v["cuda_runtime"] = cp.cuda.runtime.runtimeGetVersion()
        v["cuda_driver"] = cp.cuda.runtime.driverGetVersion()
        from cupy.cuda import nccl
        v["nccl"] = nccl.get_version()
    except Exception:
        pass
    return v


def env_flag(name: str) -> bool:
    """A TW_* debug switch: set and not 0/false/empty."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")
