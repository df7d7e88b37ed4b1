"""The vocab-parallel LM head on N ranks, run by tests/test_throughput.py as
`mpiexec -n N python -m tests.mpi_throughput [--device cpu|gpu]`.

Its greedy tokens must equal the argmax of the whole [vocab, H] matrix's logits computed on one rank
(slices of uneven size when TP does not divide the vocabulary, a rank owning 8-row padding), its
full_logits must be those logits, and every rank must pick the same tokens even when their hidden
states differ (as with nocomm). Any failed assertion raises on its rank and aborts the job (tw.dist).
"""
from __future__ import annotations

import argparse

import numpy as np

from tw.model import config
from tw.runtime import dist
from tw.serve import lm_head


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    world = dist.init(device=args.device)
    cfg = config.get("tiny")
    xp = np
    dtype = np.dtype(np.float32)
    if world.is_gpu:
        import cupy as xp
        from tw.ops import BF16 as dtype
    head = lm_head.LMHead(cfg, world, seed=3, dtype=dtype, xp=xp, max_rows=16)
    lo, hi, per = lm_head.slice_rows(cfg.vocab, world.tp_size, world.tp_rank)
    assert per % 8 == 0 and head.weight.shape == (per, cfg.hidden), (lo, hi, per)
    full = lm_head.full_weight(cfg, 3, xp).astype(dtype)
    out = xp.asarray(np.random.default_rng(7).standard_normal((12, cfg.hidden), dtype=np.float32)).astype(dtype)
    rows = np.array([0, 3, 4, 11])
    tokens = head.greedy(out, rows)
    f32 = (lambda a: a.astype(xp.float32)) if not world.is_gpu else _f32
    want = f32(out)[xp.asarray(rows)] @ f32(full).T                      # [4, vocab], float32 on one rank
    want = want.get() if hasattr(want, "get") else want
    got = head.full_logits(np.arange(len(rows)))
    assert got.shape == (len(rows), cfg.vocab), got.shape
    tol = 1e-5 if not world.is_gpu else 2e-2
    assert np.abs(got - want).max() <= tol * np.abs(want).max(), np.abs(got - want).max()
    assert (tokens == np.argmax(got, axis=1)).all(), (tokens, np.argmax(got, axis=1))
    if not world.is_gpu:
        assert (tokens == np.argmax(want, axis=1)).all(), (tokens, np.argmax(want, axis=1))
    # Different hidden states on every rank: the tokens must still agree everywhere.
    mine = xp.asarray(np.random.default_rng(100 + world.rank).standard_normal((5, cfg.hidden),
                                                                              dtype=np.float32)).astype(dtype)
    picked = head.greedy(mine, np.arange(5))
    every = world.comm.allgather(picked.tolist())
    assert all(e == every[0] for e in every), every
    assert len(head.greedy(out, np.zeros(0, np.int64))) == 0                # a step that produces nothing
    world.print0(f"PASS lm_head on {world.tp_size} ranks: slices of {per} rows, tokens {tokens.tolist()}")
    return 0


def _f32(a):
    from tw.runtime.arrays import f32_from_bf16
    return f32_from_bf16(a)


if __name__ == "__main__":
    dist.shutdown(main())
