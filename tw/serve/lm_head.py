"""A vocab-parallel LM head with greedy decoding: the model's final hidden states -> next token ids.

Weights: a seeded random [vocab, hidden] matrix, N(0, 1/hidden) like every linear layer (tw/model/weights.py,
stream (seed, layer -1, "lm_head")), so logits are O(1). Rank r holds rows [lo, hi) of it, blocks of
ceil(vocab / TP) rows rounded up to a multiple of 8 (the GPU GEMM writes 16-byte vectors of 8 bf16;
the padding rows are zero and never chosen).

Greedy argmax across ranks: each rank computes the logits of its vocabulary slice for the rows that
produce a token (GPU: ops.linear in bf16, fp32 accumulation; CPU: NumPy float32), takes its local
(max, global index) per row, and the ranks exchange these pairs with one MPI allgather of a small host
array (a few KiB per step); the largest value wins, ties go to the lowest index. Every rank ends with
the same tokens, even for `nocomm`, whose hidden states differ between ranks, so the ranks' schedulers
never diverge.
"""
from __future__ import annotations

import numpy as np

from tw import ops
from tw.model import weights


def full_weight(cfg, seed: int, xp):
    """The whole LM-head matrix [vocab, hidden], float32 (before rounding to the model's dtype)."""
    return weights.normal(xp, (cfg.vocab, cfg.hidden), cfg.hidden ** -0.5, seed, -1, "lm_head")


def slice_rows(vocab: int, tp: int, rank: int) -> tuple[int, int, int]:
    """(lo, hi, padded) of rank's vocabulary rows: [lo, hi) real, `padded` rows held (a multiple of 8)."""
    per = -(-vocab // tp)
    per = -(-per // 8) * 8
    lo = min(vocab, rank * per)
    return lo, min(vocab, lo + per), per


def memory_bytes(cfg, tp: int, max_rows: int, dtype_bytes: int) -> int:
    """What one rank holds for the LM head: its slice, the float32 full matrix while it is sliced,
    and the per-step buffers (rows, logits, their float32 copy)."""
    _, _, per = slice_rows(cfg.vocab, tp, 0)
    return (per * cfg.hidden * dtype_bytes + cfg.vocab * cfg.hidden * 4
            + max_rows * (cfg.hidden * dtype_bytes + per * (dtype_bytes + 4)))


class LMHead:
    def __init__(self, cfg, world, seed: int, dtype, xp, max_rows: int):
        self.cfg, self.world, self.xp, self.dtype = cfg, world, xp, dtype
        self.lo, self.hi, per = slice_rows(cfg.vocab, world.tp_size, world.tp_rank)
        full = full_weight(cfg, seed, xp)
        self.weight = xp.zeros((per, cfg.hidden), dtype)                 # [vocab/TP padded, H]
        self.weight[:self.hi - self.lo] = full[self.lo:self.hi].astype(dtype)
        del full
        self.rows = xp.zeros((max_rows, cfg.hidden), dtype)              # the producing rows' states
        self.logits = xp.zeros((max_rows, per), dtype)
        self.max_rows, self._n, self._local, self._stream = max_rows, 0, None, None
        if world.is_gpu:
            xp.cuda.Device().synchronize()

    def greedy(self, out, rows, stream=None) -> np.ndarray:
        """Next token ids (host int64 [n]) of `rows` of the final hidden states `out` [T, H]: the logits
        of this rank's slice, then the argmax across ranks. Collective over the TP group."""
        self.launch(out, rows, stream)
        return self.finish()

    def launch(self, out, rows, stream=None) -> None:
        """The device part of greedy(): gather the rows, the logits GEMM, the local max and argmax
        (queued on `stream` on the GPU, so a caller can record an event after it)."""
        rows = np.asarray(rows, dtype=np.int64)
        n = self._n = len(rows)
        if n > self.max_rows:
            raise ValueError(f"{n} rows produce tokens; the LM head was sized for {self.max_rows}")
        self._local, self._stream = None, stream
        if n == 0:
            return
        width, xp = self.hi - self.lo, self.xp
        if self.world.is_gpu:
            with stream or xp.cuda.get_current_stream():
                # as uint16: a row copy needs no bf16 arithmetic (the same bits either way)
                xp.take(out.view(xp.uint16), xp.asarray(rows), axis=0, out=self.rows[:n].view(xp.uint16))
                ops.linear(self.rows[:n], self.weight, self.logits[:n], stream)
                self._local = self._local_max(self._f32(n), width)
        else:
            np.take(out, rows, axis=0, out=self.rows[:n])
            ops.linear(self.rows[:n], self.weight, self.logits[:n])
            self._local = self._local_max(self.logits[:n], width)

    def finish(self) -> np.ndarray:
        """The host part of greedy(): wait for launch(), exchange (max, index) pairs, pick the tokens."""
        n = self._n
        if n == 0:
            return np.zeros(0, np.int64)
        best, arg = self._local
        if self.world.is_gpu:
            with self._stream or self.xp.cuda.get_current_stream():  # copies ordered after launch()'s work
                best, arg = best.get(), arg.get()
        mine = np.stack([best.astype(np.float64), arg.astype(np.float64) + self.lo], axis=1)   # [n, 2]
        every = np.empty((self.world.tp_size, n, 2), np.float64)
        self.world.tp_comm.Allgather(mine, every)
        return pick(every[:, :, 0], every[:, :, 1].astype(np.int64))

    def _f32(self, n):
        from tw.runtime.arrays import f32_from_bf16
        return f32_from_bf16(self.logits[:n])

    def _local_max(self, logits, width):
        xp = self.xp
        if width == 0:   # a rank with no vocabulary rows (more ranks than 8-row blocks): never chosen
            return xp.full(logits.shape[0], -np.inf, np.float32), xp.zeros(logits.shape[0], np.int64)
        real = logits[:, :width]
        return real.max(axis=1), real.argmax(axis=1)      # argmax: the first (lowest) index of the max

    def full_logits(self, positions) -> np.ndarray:
        """Full-vocabulary logits (float64 host [len(positions), vocab]) of rows `positions` of the last
        greedy() call, gathered from every rank (for checks; collective over the TP group)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and positions.max() >= self._n:
            raise ValueError(f"positions {positions.tolist()} past the last call's {self._n} rows")
        width = self.hi - self.lo
        if self.world.is_gpu:
            with self._stream or self.xp.cuda.get_current_stream():
                part = self._f32(self._n)[self.xp.asarray(positions), :width].get()
        else:
            part = self.logits[positions, :width]
        parts = self.world.tp_comm.allgather(np.ascontiguousarray(part, dtype=np.float64))
        return np.concatenate(parts, axis=1)


def pick(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Per column of [ranks, n] local maxima and their global indices: the index of the largest value,
    the lowest index among equal ones."""
    best = values.max(axis=0)
    big = np.iinfo(np.int64).max
    chosen = np.where(values == best[None, :], indices, big).min(axis=0)
    if (chosen == big).any():
        raise FloatingPointError(f"non-finite logits in {int((chosen == big).sum())} rows: no token to pick")
    return chosen
