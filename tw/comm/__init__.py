"""Transports for the tensor-parallel all-reduce and the fused AllReduce + residual-add + RMSNorm.

One interface (`Transport`), one factory (`make`), one constructor shape:

    comm = make(kind, world, hidden, max_tokens, dtype, sharded=True, **options)

| kind       | module        | what moves the bytes                                                  |
|------------|---------------|-----------------------------------------------------------------------|
| `nccl`     | `nccl.py`     | NCCL all-reduce (unsharded) or reduce-scatter + norm + all-gather     |
| `p2p`      | `p2p.py`      | our kernels over CUDA-IPC peer pointers (cuda/ar_norm_p2p.cu); they   |
|            |               | push partials to their owner, or with `pull=True` the owner pulls     |
| `none`     | `nocomm.py`   | nothing: the "communication is free" bound (output not the model's)   |
| `multimem` | `multimem.py` | NVLS multicast; compiled, refuses to run on the lab machines (Rule 1) |
| `ce`       | `ce.py`       | peer copies on the copy engines + a local add + RMSNorm kernel        |
| (cpu)      | `cpu.py`      | NumPy + MPI collectives: what `nccl`, `p2p` and `ce` are on the CPU   |

`emulate=Emulation(tp, rank)` (tw/comm/emulation.py) makes `p2p` play one rank of a TP group alone, over
stand-in peers (`standin.py`; on the CPU, `cpu.CpuLoopback`); the other kinds refuse it.

The contract (docs/design.md#transports):

    comm.name      "nccl", "p2p", "ce", "none", "multimem" or "cpu": what result rows record as `transport`
    comm.sharded   the order ar_add_norm uses unless a call says otherwise (see below)
    comm.staging(num_tokens) -> [num_tokens, hidden] array
        Where a row-parallel GEMM writes its partial output. For P2P this is the registered (IPC)
        buffer itself, so the GEMM output needs no extra copy.
    comm.all_reduce(start, end, stream=None, ctas=None)
        staging[start:end] <- sum over TP ranks of staging[start:end], on every rank.
    comm.ar_add_norm(start, end, residual, weight, eps, out, stream=None, sharded=None, ctas=None)
        For the token rows [start, end):
            h = sum over ranks of staging[rows] + residual[rows]
            residual[rows] <- h            (sharded: only the rows this rank owns, see owned_rows)
            out[rows] <- RMSNorm(h) * weight   (every row, on every rank)
        sharded=False is the baseline order (AllReduce, then add + norm on every token);
        sharded=True is TokenWeave's order (ReduceScatter, add + norm on 1/TP of the tokens,
        AllGather); None means comm.sharded. With sharded=True the residual rows a rank does not own
        are stale; that is fine because the same row ranges are used for every call of one pass.
    comm.check()
        Raise if a transport call failed without raising at its launch (P2P: a peer that never
        arrived); synchronizes the device. A no-op for transports that fail where they fail.
    comm.close()
        Release what the transport holds beyond Python objects (P2P: the peers' IPC mappings).

`owned_rows` is the single definition of which rows a rank owns; kernels and CPU code follow it.
"""
from __future__ import annotations

import warnings
from typing import Protocol

import numpy as np

KINDS = ("nccl", "p2p", "none", "multimem", "ce")


class Transport(Protocol):
    name: str
    sharded: bool
    max_tokens: int

    def staging(self, num_tokens: int): ...

    def all_reduce(self, start: int, end: int, stream=None, ctas=None) -> None: ...

    def ar_add_norm(self, start: int, end: int, residual, weight, eps: float, out, stream=None,
                    sharded: bool | None = None, ctas=None) -> None: ...

    def check(self) -> None: ...

    def close(self) -> None: ...


def make(kind: str, world, hidden: int, max_tokens: int, dtype, *, sharded: bool = True, **options) -> Transport:
    """A transport of `kind` for rows of `hidden` elements, up to `max_tokens` rows.

    On a CPU world `nccl`, `p2p` and `ce` become the `cpu` transport (MPI collectives). `p2p` and `ce`
    fall back to `nccl` with one warning when peer access between the TP ranks does not work; the returned
    transport's `name` then says `nccl`. options go to the transport (p2p: ctas, timeout_s,
    oneshot_max_tokens; ce: ctas, chunks, timeout_s; multimem: ctas, timeout_s)."""
    if kind not in KINDS:
        raise ValueError(f"unknown transport {kind!r}; expected one of {KINDS}")
    emulate = options.pop("emulate", None)
    if emulate is not None and kind != "none":
        return _emulated(kind, world, hidden, max_tokens, dtype, sharded, emulate, options)
    if kind == "none":
        from tw.comm.nocomm import NoComm
        return NoComm(world, hidden, max_tokens, dtype, sharded=sharded)
    if kind == "multimem":
        from tw.comm.multimem import MultimemComm  # refuses before touching the driver unless allowed
        return MultimemComm(world, hidden, max_tokens, dtype, sharded=sharded, **options)
    if not world.is_gpu:
        from tw.comm.cpu import CpuComm
        return CpuComm(world, hidden, max_tokens, dtype, sharded=sharded)
    from tw.comm.nccl import NcclComm
    if kind == "nccl":
        return NcclComm(world, hidden, max_tokens, dtype, sharded=sharded)
    if kind == "ce":
        from tw.comm.ce import CeComm as peer, CeUnavailable as unavailable
    else:
        from tw.comm.p2p import P2PComm as peer, P2PUnavailable as unavailable
    try:
        return peer(world, hidden, max_tokens, dtype, sharded=sharded, **options)
    except unavailable as e:
        if world.rank == 0:
            warnings.warn(f"{kind.upper()} transport unavailable, falling back to NCCL: {e}", RuntimeWarning,
                          stacklevel=2)
        return NcclComm(world, hidden, max_tokens, dtype, sharded=sharded)


def _emulated(kind, world, hidden, max_tokens, dtype, sharded, emulate, options):
    """The emulated rank's transport (tw/comm/emulation.py): p2p over stand-in peers (the CPU: its NumPy twin).
    NCCL needs real ranks; the copy engines copy between GPUs, and a same-device copy runs on the SMs
    (docs/hardware.md), so a CE emulation would not be faithful and is refused."""
    if kind != "p2p":
        raise ValueError(f"transport {kind!r} cannot be emulated on one GPU: "
                         + {"nccl": "NCCL needs one real rank per GPU",
                            "ce": "a same-device copy runs on the SMs, not on the copy engines it would use "
                                  "between GPUs, so its emulation would not be faithful",
                            "multimem": "multicast objects are never created on the lab machines"}.get(kind, "")
                         + "; use p2p")
    if not world.is_gpu:
        from tw.comm.cpu import CpuLoopback
        return CpuLoopback(world, hidden, max_tokens, dtype, sharded=sharded, emulate=emulate,
                           pull=options.get("pull", False))
    from tw.comm.p2p import P2PComm
    return P2PComm(world, hidden, max_tokens, dtype, sharded=sharded, emulate=emulate, **options)


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
    share (cpu, nccl, nocomm): the staging view, the row-range check, no-op check() and close().
    Subclasses set self.buf, self.max_tokens and self.sharded in __init__."""

    def check(self) -> None:
        """Nothing to check: failures of this transport raise where they happen (see P2PComm.check)."""

    def close(self) -> None:
        """Nothing to release: the buffers are plain arrays."""

    def _sharded(self, sharded: bool | None) -> bool:
        return self.sharded if sharded is None else bool(sharded)

    def staging(self, num_tokens: int):
        return self.buf[:num_tokens]

    def _range(self, start, end) -> None:
        check_range(start, end, self.max_tokens)
