"""CPU transport: NumPy buffers and MPI collectives, the same contract as the GPU transports.

Lets every schedule run, and be checked, on a machine with no GPU. Timings mean nothing here.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from tw import ops
from tw.comm import BufferComm, owned_rows


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


class CpuLoopback(BufferComm):
    """The emulated rank on the CPU (tw/comm/emulation.py): rank `emulate.rank` of TP=`emulate.tp` in one
    process, with NumPy stand-in peers that follow the P2P kernel's data flow step by step, so CPU tests
    check which rows go where (cuda/ar_norm_p2p.cu, p2p_ar_norm and p2p_all_reduce):
      phase 1: my partials of peer j's rows -> stand-in j's recv[me] (rows relative to j's first row);
      phase 2: my rows = my staging + recv[k] for every k != me (in rank order) [+ residual, norm];
               the results -> my staging/out and every stand-in's staging/out at the same rows.
    Regions (region(rank, name)): staging and out [max_tokens, hidden], recv [tp, chunk_max, hidden].
    My recv is filled once with a fixed pattern (the peers' partials); nobody writes it afterwards."""

    name = "cpu"

    def __init__(self, world, hidden: int, max_tokens: int, dtype=np.float32, *, sharded: bool = True, emulate=None,
                 pull: bool = False):
        if emulate is None:
            raise ValueError("CpuLoopback needs an Emulation (tw/comm/emulation.py)")
        if world.tp_size != 1:
            raise ValueError(f"an emulated rank runs alone: the world has TP={world.tp_size}, expected 1")
        self.sharded, self.emulate, self.pull = bool(sharded), emulate, bool(pull)
        self.tp, self.rank = emulate.tp, emulate.rank
        self.hidden, self.max_tokens = hidden, max_tokens
        self.chunk_max = -(-max_tokens // self.tp)
        pattern = lambda shape: (np.arange(int(np.prod(shape))) % 256 / 4096 + 1 / 128).astype(dtype).reshape(shape)  # noqa: E731
        self._regions = [{"staging": pattern((max_tokens, hidden)), "out": pattern((max_tokens, hidden)),
                          "recv": pattern((self.tp, self.chunk_max, hidden))} for _ in range(self.tp)]
        self.buf = self._regions[self.rank]["staging"]  # [max_tokens, hidden]: my staging

    def region(self, rank: int, name: str):
        """Rank `rank`'s region `name` (mine for rank == self.rank, else the stand-in's)."""
        return self._regions[rank][name]

    def _push_partials(self, start, end):
        for j in range(self.tp):
            if j != self.rank:
                lo, hi = owned_rows(start, end, j, self.tp)
                self._regions[j]["recv"][self.rank, :hi - lo] = self.buf[lo:hi]

    def _sum_mine(self, start, end, pull: bool = False):
        """My rows' sum in rank order: pushed partials from my recv, or (pull) read from the stand-ins' staging."""
        lo, hi = owned_rows(start, end, self.rank, self.tp)
        recv = self._regions[self.rank]["recv"]
        acc = np.zeros((hi - lo, self.hidden), np.float32)
        for k in range(self.tp):
            if k == self.rank:
                acc += self.buf[lo:hi]
            else:
                acc += self._regions[k]["staging"][lo:hi] if pull else recv[k, :hi - lo]
        return lo, hi, acc

    def all_reduce(self, start, end, stream=None, ctas=None):
        """staging[my rows] <- the sum over my staging and the stand-ins' partials, pushed to every stand-in."""
        self._range(start, end)
        self._push_partials(start, end)
        lo, hi, acc = self._sum_mine(start, end)
        for j in range(self.tp):
            self._regions[j]["staging"][lo:hi] = acc

    def ar_add_norm(self, start, end, residual, weight, eps, out, stream=None, sharded=None, ctas=None):
        self._range(start, end)
        if not self._sharded(sharded):
            raise ValueError("the emulated rank runs the sharded order only (fused, tokenweave)")
        comm_mode = self.emulate.comm
        if comm_mode == "none":      # decomposition runs (tw/comm/emulation.py): nothing
            return
        if comm_mode == "norm":      # my rows' add + norm from my own staging, nothing to or from peers
            lo, hi = owned_rows(start, end, self.rank, self.tp)
            ops.add_rmsnorm(self.buf[lo:hi], residual[lo:hi], weight, eps, out[lo:hi])
            return
        if not self.pull:
            self._push_partials(start, end)
        lo, hi, acc = self._sum_mine(start, end, self.pull)
        ops.add_rmsnorm(acc, residual[lo:hi], weight, eps, out[lo:hi])
        for j in range(self.tp):
            if j != self.rank:
                self._regions[j]["out"][lo:hi] = out[lo:hi]
