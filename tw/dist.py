"""The one MPI / device / NCCL bootstrap.

One MPI rank per GPU. The tensor-parallel (TP) group is made of ranks of one node (MPI
`COMM_TYPE_SHARED`); a node's ranks form `local_size / tp` TP groups, and all TP groups in the job are
data-parallel (DP) replicas. Each rank uses GPU `local_rank`.

An uncaught exception on any rank prints `[rank R] <traceback>` and aborts the whole MPI job, so one
failing rank never leaves the others waiting in a collective.
"""
from __future__ import annotations

import functools
import os
import sys
import traceback
from dataclasses import dataclass, field

from mpi4py import MPI


class LaunchError(RuntimeError):
    """The job was started with a shape that cannot work (ranks, GPUs, TP)."""


def _abort_on_uncaught(exc_type, exc, tb):
    rank = MPI.COMM_WORLD.Get_rank()
    if issubclass(exc_type, LaunchError):  # the user's mistake, not ours: the message is enough
        msg = f"error: {exc}"
    else:
        msg = "".join(traceback.format_exception(exc_type, exc, tb))
    sys.stderr.write("".join(f"[rank {rank}] {line}\n" for line in msg.rstrip().splitlines()))
    sys.stderr.flush()
    if MPI.COMM_WORLD.Get_size() > 1:
        MPI.COMM_WORLD.Abort(1)
    sys.exit(1)


def install_abort_hook() -> None:
    sys.excepthook = _abort_on_uncaught


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
        if self._nccl is None:
            from cupy.cuda import nccl
            uid = nccl.get_unique_id() if self.tp_rank == 0 else None
            uid = self.tp_comm.bcast(uid, root=0)
            self._nccl = nccl.NcclCommunicator(self.tp_size, uid, self.tp_rank)
        return self._nccl

    def sub(self, tp: int) -> "World":
        """A world over the same ranks with a smaller TP degree (e.g. tp=1 to compare TP=2 with TP=1)."""
        return _make_world(self.comm, self.local_comm, tp, self.device, self.device_id)


def _make_world(comm, local_comm, tp, device, device_id) -> World:
    local_rank, local_size = local_comm.Get_rank(), local_comm.Get_size()
    if tp < 1 or local_size % tp != 0:
        raise LaunchError(f"--tp {tp} must divide the {local_size} ranks on this node "
                          f"(TP groups are made of ranks of one node); launch with mpirun -n {tp} "
                          f"or pick a TP degree that divides {local_size}")
    tp_comm = local_comm.Split(color=local_rank // tp, key=local_rank)
    return World(comm=comm, local_comm=local_comm, tp_comm=tp_comm, device=device, device_id=device_id)


def init(tp: int | None = None, device: str = "auto") -> World:
    """Set up the MPI world, the TP group and this rank's device.

    tp: TP degree; None = every rank of the node in one group. device: "auto" (GPU if one is usable,
    else CPU), "gpu" or "cpu".
    """
    install_abort_hook()
    if device not in ("auto", "gpu", "cpu"):
        raise ValueError(f"device must be auto, gpu or cpu, got {device!r}")
    comm = MPI.COMM_WORLD
    local_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
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
        too_few = local_size > ngpu
        if local_comm.allreduce(too_few, op=MPI.LOR):
            raise LaunchError(f"{local_size} ranks on this node but only {ngpu} GPU(s) visible: "
                              "one rank per GPU; use mpirun -n <number of GPUs>")
        import cupy as cp
        device_id = local_rank
        cp.cuda.Device(device_id).use()
        global _GPU_IN_USE
        _GPU_IN_USE = True
    return _make_world(comm, local_comm, tp, "gpu" if use_gpu else "cpu", device_id)


_GPU_IN_USE = False  # set by init() when this rank drives a GPU


def shutdown(code: int = 0) -> None:
    """End this rank now: flush, wait for every rank, finalize MPI, exit.

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
