"""NCCL transport (the baseline), in both orders of the fused contract (see tw/comm/__init__.py).

sharded=False: NCCL all-reduce of all rows, then the fused add + RMSNorm kernel on all rows (vLLM's
order). sharded=True: NCCL reduce-scatter -> add + RMSNorm on this rank's rows -> NCCL all-gather
(TokenWeave's order, but three launches instead of one kernel).
"""
from __future__ import annotations

import cupy as cp
from cupy.cuda import nccl

from tw import ops
from tw.comm import BufferComm, owned_rows


class NcclComm(BufferComm):
    name = "nccl"

    def __init__(self, world, hidden: int, max_tokens: int, dtype=ops.BF16, *, sharded: bool = True):
        if dtype != ops.BF16:
            raise TypeError(f"NcclComm moves bfloat16, got {dtype}")
        self.sharded = bool(sharded)
        self.nccl = world.nccl
        self.tp, self.rank = world.tp_size, world.tp_rank
        self.hidden = hidden
        # Padded by tp rows: reduce-scatter sends tp * ceil(n / tp) rows (the pad rows' sums are unused).
        self.buf = cp.empty((max_tokens + self.tp, hidden), dtype=dtype)       # [max_tokens + tp, hidden]
        self.rs_out = cp.empty((-(-max_tokens // self.tp), hidden), dtype=dtype)  # [ceil(max/tp), hidden]
        self.ag_out = cp.empty((max_tokens + self.tp, hidden), dtype=dtype)    # [max_tokens + tp, hidden]
        self.max_tokens = max_tokens

    def all_reduce(self, start, end, stream=None, ctas=None):
        self._range(start, end)
        stream = stream or cp.cuda.get_current_stream()
        ptr = self.buf[start].data.ptr if end > start else 0
        self.nccl.allReduce(ptr, ptr, (end - start) * self.hidden, nccl.NCCL_BFLOAT16, nccl.NCCL_SUM, stream.ptr)

    def reduce_scatter(self, start, end, stream=None):
        """rs_out[:rows owned] <- sum over ranks of this rank's owned rows of buf[start:end]."""
        self._range(start, end)
        stream = stream or cp.cuda.get_current_stream()
        chunk = -(-(end - start) // self.tp)
        self.nccl.reduceScatter(self.buf[start].data.ptr, self.rs_out.data.ptr, chunk * self.hidden,
                                nccl.NCCL_BFLOAT16, nccl.NCCL_SUM, stream.ptr)

    def ar_add_norm(self, start, end, residual, weight, eps, out, stream=None, sharded=None, ctas=None):
        stream = stream or cp.cuda.get_current_stream()
        if end == start:
            return
        if not self._sharded(sharded):
            self.all_reduce(start, end, stream)
            ops.add_rmsnorm(self.buf[start:end], residual[start:end], weight, eps, out[start:end], stream)
            return
        self.reduce_scatter(start, end, stream)
        lo, hi = owned_rows(start, end, self.rank, self.tp)
        chunk = -(-(end - start) // self.tp)
        # Norm my rows into my slot of the gather buffer, then all-gather in place (NCCL's in-place form:
        # sendbuff = recvbuff + rank * count).
        mine = self.ag_out[self.rank * chunk:self.rank * chunk + (hi - lo)]
        ops.add_rmsnorm(self.rs_out[:hi - lo], residual[lo:hi], weight, eps, mine, stream)
        self.nccl.allGather(self.ag_out[self.rank * chunk].data.ptr, self.ag_out.data.ptr, chunk * self.hidden,
                            nccl.NCCL_BFLOAT16, stream.ptr)
        cp.cuda.runtime.memcpyAsync(out[start].data.ptr, self.ag_out.data.ptr,
                                    (end - start) * self.hidden * out.itemsize,
                                    cp.cuda.runtime.memcpyDeviceToDevice, stream.ptr)
