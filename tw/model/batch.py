"""A batch of tokens: which sequence each token belongs to, its position, and its KV-cache slot.

A batch is a list of sequences, each with `new` tokens to process now and `prefix` tokens whose K/V are
already in the KV cache (a chunked-prefill continuation, or a decode step when new == 1). Sequence s
owns the cache slots [kv_start[s], kv_start[s] + prefix[s] + new[s]); token j of it has position
prefix[s] + j and is stored at slot kv_start[s] + prefix[s] + j.

Splitting at token t (TokenWeave's halves A = tokens [0, t), B = [t, T)) cuts the sequence that
straddles t: its first part goes to A, its rest to B with a prefix that now includes A's part, so B's
attention reads A's K/V from the cache exactly as chunked prefill does. A must run its attention
(which stores its K/V) before B's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Seq:
    new: int         # tokens processed in this batch
    prefix: int = 0  # tokens already in the KV cache
    kv_start: int = 0

    def __post_init__(self):
        if self.new < 1 or self.prefix < 0:
            raise ValueError(f"a sequence needs new >= 1 and prefix >= 0, got new={self.new} prefix={self.prefix}")


class Batch:
    def __init__(self, seqs: list[Seq], offset: int = 0):
        if not seqs:
            raise ValueError("a batch needs at least one sequence")
        self.seqs = list(seqs)
        self.offset = offset  # row of this batch's first token in the full batch (nonzero for half B)
        new = np.array([s.new for s in seqs], dtype=np.int64)
        self.cu_seqlens = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)     # [S + 1]
        self.prefix = np.array([s.prefix for s in seqs], dtype=np.int32)              # [S]
        self.kv_start = np.array([s.kv_start for s in seqs], dtype=np.int32)          # [S]
        seq_of = np.repeat(np.arange(len(seqs)), new)
        j = np.arange(self.num_tokens) - self.cu_seqlens[seq_of]
        self.pos = (self.prefix[seq_of] + j).astype(np.int32)                          # [T]
        self.slot = (self.kv_start[seq_of] + self.pos).astype(np.int32)                # [T]

    @property
    def num_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    @property
    def kv_capacity(self) -> int:
        return int(max(s.kv_start + s.prefix + s.new for s in self.seqs))

    def __repr__(self):
        return f"Batch({self.num_tokens} tokens, {len(self.seqs)} seqs, offset {self.offset})"

    def split(self, at: int) -> tuple["Batch", "Batch"]:
        """Halves A = tokens [0, at) and B = [at, T); 0 < at < T. The straddling sequence is cut."""
        if not 0 < at < self.num_tokens:
            raise ValueError(f"split point {at} must lie strictly inside the batch of {self.num_tokens} tokens")
        a, b = [], []
        for s, seq in enumerate(self.seqs):
            lo, hi = int(self.cu_seqlens[s]), int(self.cu_seqlens[s + 1])
            if hi <= at:
                a.append(seq)
            elif lo >= at:
                b.append(seq)
            else:
                a.append(Seq(at - lo, seq.prefix, seq.kv_start))
                b.append(Seq(hi - at, seq.prefix + at - lo, seq.kv_start))
        return Batch(a, self.offset), Batch(b, self.offset + at)


def prefill(num_tokens: int, seq_len: int, prefix: int = 0) -> Batch:
    """`num_tokens` new tokens in sequences of `seq_len` (the last may be shorter), each with `prefix`
    tokens already cached; sequences get disjoint cache regions laid out one after another."""
    if num_tokens < 1 or seq_len < 1:
        raise ValueError(f"need num_tokens >= 1 and seq_len >= 1, got {num_tokens}, {seq_len}")
    seqs, kv = [], 0
    for start in range(0, num_tokens, seq_len):
        new = min(seq_len, num_tokens - start)
        seqs.append(Seq(new, prefix, kv))
        kv += prefix + new
    return Batch(seqs)


def workload(num_tokens: int, seq_len: int, prefix: int = 0, decode: int = 0, decode_context: int = 1024) -> Batch:
    """A serving-style batch of `num_tokens` tokens: `decode` decode tokens (one per sequence, each with
    `decode_context` tokens cached) and the rest as prefill sequences of `seq_len` with `prefix` cached
    (chunked prefill). decode=0 is plain prefill."""
    if not 0 <= decode < num_tokens:
        raise ValueError(f"decode tokens ({decode}) must leave at least one prefill token of {num_tokens}")
    lengths = [(min(seq_len, num_tokens - decode - s), prefix) for s in range(0, num_tokens - decode, seq_len)]
    return mixed(lengths + [(1, decode_context)] * decode)


def mixed(lengths: list[tuple[int, int]]) -> Batch:
    """A batch from (new, prefix) pairs, e.g. [(300, 0), (1, 900), (77, 64)]: prefill, decode, chunk."""
    seqs, kv = [], 0
    for new, prefix in lengths:
        seqs.append(Seq(new, prefix, kv))
        kv += prefix + new
    return Batch(seqs)


def token_ids(num_tokens: int, vocab: int, seed: int) -> np.ndarray:
    """Random token ids in [0, vocab), int32, the same on every rank for the same seed."""
    return np.random.default_rng(seed).integers(0, vocab, size=num_tokens, dtype=np.int32)
