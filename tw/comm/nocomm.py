"""`nocomm`: every all-reduce removed. The upper bound of "communication is free".

Its output is NOT the model's output (partial sums are never reduced), so correctness checks skip it.
ar_add_norm does the add + RMSNorm on every row whatever the order asked for: the work of the
baseline's norm, without its communication.
"""
from __future__ import annotations

from tw import ops
from tw.comm import BufferComm


class NoComm(BufferComm):
    name = "none"

    def __init__(self, world, hidden: int, max_tokens: int, dtype, *, sharded: bool = False):
        if world.is_gpu:
            import cupy as xp
        else:
            import numpy as xp
        self.sharded = bool(sharded)
        self.buf = xp.empty((max_tokens, hidden), dtype=dtype)  # [max_tokens, hidden]
        self.max_tokens = max_tokens

    def all_reduce(self, start, end, stream=None, ctas=None):
        pass

    def ar_add_norm(self, start, end, residual, weight, eps, out, stream=None, sharded=None, ctas=None):
        ops.add_rmsnorm(self.buf[start:end], residual[start:end], weight, eps, out[start:end], stream)
