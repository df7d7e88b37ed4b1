"""Transports for the tensor-parallel all-reduce and the fused AllReduce + residual-add + RMSNorm.

Every transport has the same contract (`nccl.py`, `p2p.py`, `cpu.py`; `multimem.py` is compiled but
refuses to run on the lab machines):

    comm.staging(num_tokens) -> [num_tokens, hidden] array
        Where a row-parallel GEMM writes its partial output. For P2P this is the registered (IPC)
        buffer itself, so the GEMM output needs no extra copy.

    comm.all_reduce(start, end, stream)
        staging[start:end] <- sum over TP ranks of staging[start:end], on every rank.

    comm.ar_add_norm(start, end, residual, weight, eps, out, stream, sharded)
        For the token rows [start, end):
            h = sum over ranks of staging[rows] + residual[rows]
            residual[rows] <- h            (sharded=True: only the rows this rank owns, see owned_rows)
            out[rows] <- RMSNorm(h) * weight   (every row, on every rank)
        sharded=False is the baseline order (AllReduce, then add + norm on every token);
        sharded=True is TokenWeave's order (ReduceScatter, add + norm on 1/TP of the tokens,
        AllGather). With sharded=True the residual rows a rank does not own are stale; that is fine
        because the same row ranges are used for every call of one forward pass.

    comm.check()
        Raise if a transport call failed without raising at its launch (P2P: a peer that never
        arrived); synchronizes the device. A no-op for transports that fail where they fail.

`owned_rows` is the single definition of which rows a rank owns; kernels and CPU code follow it.
"""
from __future__ import annotations

import numpy as np


def owned_rows(start: int, end: int, rank: int, tp: int) -> tuple[int, int]:
    """Rows of [start, end) that TP rank `rank` reduces, adds and normalizes in the sharded order:
    contiguous blocks of ceil(n / tp) rows; the last ranks may own fewer (or none when n < tp)."""
    n = end - start
    chunk = -(-n // tp)
    lo = min(end, start + rank * chunk)
    hi = min(end, lo + chunk)
    return lo, hi


def check_range(start, end, max_tokens: int) -> None:
    """The row range [start, end) every transport call gets must lie inside its buffers."""
    if not (isinstance(start, (int, np.integer)) and isinstance(end, (int, np.integer))):
        raise TypeError(f"start and end must be ints, got {type(start).__name__}, {type(end).__name__}")
    if not 0 <= start <= end:
        raise ValueError(f"bad row range [{start}, {end}): need 0 <= start <= end")
    if end > max_tokens:
        raise ValueError(f"row range [{start}, {end}) ends past the communication buffer "
                         f"(max_tokens={max_tokens}); build the transport with a larger max_tokens")


class BufferComm:
    """What the transports whose staging buffer is one plain array `self.buf` of `self.max_tokens` rows
    share (cpu, nccl, nocomm): the staging view, the row-range check, and a no-op check(). Subclasses
    set self.buf and self.max_tokens in __init__."""

    def check(self) -> None:
        """Nothing to check: failures of this transport raise where they happen (see P2PComm.check)."""

    def staging(self, num_tokens: int):
        return self.buf[:num_tokens]

    def _range(self, start, end) -> None:
        check_range(start, end, self.max_tokens)
