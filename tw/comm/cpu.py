"""CPU transport: NumPy buffers and MPI collectives, the same contract as the GPU transports.

Lets every schedule run, and be checked, on a machine with no GPU. Timings mean nothing here.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from .. import ops
from . import BufferComm, owned_rows


class CpuComm(BufferComm):
    name = "cpu"

    def __init__(self, world, hidden: int, max_tokens: int, dtype=np.float32, *, sharded: bool = True):
        self.sharded = bool(sharded)
        self.comm = world.tp_comm
        self.tp, self.rank = world.tp_size, world.tp_rank
        self.hidden, self.max_tokens = hidden, max_tokens
        self.buf = np.zeros((max_tokens, hidden), dtype=dtype)  # [max_tokens, hidden]

    def all_reduce(self, start, end, stream=None, ctas=None):
        self._range(start, end)
        self.comm.Allreduce(MPI.IN_PLACE, self.buf[start:end], op=MPI.SUM)

    def ar_add_norm(self, start, end, residual, weight, eps, out, stream=None, sharded=None, ctas=None):
        self._range(start, end)
        if not self._sharded(sharded):
            self.all_reduce(start, end)
            ops.add_rmsnorm(self.buf[start:end], residual[start:end], weight, eps, out[start:end])
            return
        bounds = [owned_rows(start, end, r, self.tp) for r in range(self.tp)]
        counts = [(hi - lo) * self.hidden for lo, hi in bounds]
        displs = [(lo - start) * self.hidden for lo, _ in bounds]
        lo, hi = bounds[self.rank]
        mine = np.empty((hi - lo, self.hidden), dtype=self.buf.dtype)
        self.comm.Reduce_scatter(self.buf[start:end], mine, recvcounts=counts, op=MPI.SUM)
        ops.add_rmsnorm(mine, residual[lo:hi], weight, eps, out[lo:hi])
        self.comm.Allgatherv(out[lo:hi].copy(), [out[start:end], counts, displs, MPI.FLOAT if
                                                  out.dtype == np.float32 else MPI.DOUBLE])
