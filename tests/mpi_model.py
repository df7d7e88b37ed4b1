"""Multi-rank model checks, run by tests/test_model.py (CPU) and tests/test_gpu.py (GPU) as
`mpiexec -n N python -m tests.mpi_model --device cpu|gpu --model M`.

1. every strategy's output vs the float64 reference, on batches with several sequences, a prefix
   already in the cache, decode tokens, and token counts not divisible by TP;
2. TP=N output vs a TP=1 run of the same weights on the same rank (sub-world);
3. the transports' contract with rank-and-row encoded data (exact).
Any failed assertion raises on its rank, which aborts the job with the message (tw.dist).
"""
from __future__ import annotations

import argparse

import numpy as np

from tw.model import config, reference
from tw.model import batch as batching
from tw.runtime import dist
from tw.schedule import strategies as schedules
from tw import comm as transports
from tw.comm import owned_rows
from tw.runtime.arrays import to_host
from tw.model.model import Model


def check_strategies(world, cfg, strategies, batches, seed=1):
    max_tokens = max(b.num_tokens for b in batches)
    model = Model(cfg, world, max_tokens, max(b.kv_capacity for b in batches), seed=seed)
    tol = reference.tolerance(model.dtype)
    # min_split_tokens=16: small test batches are split too, cutting a request across the halves.
    built = [schedules.make(s, model, world, min_split_tokens=16) for s in strategies]
    outputs = {}
    for b in batches:
        ids = batching.token_ids(b.num_tokens, cfg.vocab, seed)
        routed = bool(cfg.num_experts)   # MoE: a reference per strategy, following its routing at near-ties
        # The reference once per job, on rank 0 (its routing: a rank routing otherwise fails its own check).
        ref = None if routed else reference.forward_once(world, cfg, b, ids, seed, model.xp, model.dtype)
        for strat in built:
            plan = strat.prepare(b, ids)
            model.routing = {} if routed else None
            out = strat.forward(plan)
            if routed:
                ref = reference.forward_once(world, cfg, b, ids, seed, model.xp, model.dtype,
                                             model.routing if world.rank == 0 else None)
                model.routing = None
            err = reference.rel_err(out, ref)
            assert err["rel_err"] <= tol, (f"{strat.name} on {b}: rel_err {err['rel_err']:.3e} > {tol} "
                                           f"(max abs {err['max_abs_err']:.3e}, mean abs {err['mean_abs_err']:.3e})")
            world.print0(f"PASS {cfg.name} tp={world.tp_size} {strat.name:<8} {b}: rel_err {err['rel_err']:.2e}")
            outputs[(strat.name, b.num_tokens)] = to_host(out).astype(np.float64)
            if world.is_gpu and not cfg.num_experts:   # an MoE block waits on the host: no graphs
                check_graph_replay(world, strat, plan, ref, tol, b)
    return outputs


def check_graph_replay(world, strat, plan, ref, tol, b, replays=3):
    """The strategy's forward captured once as a CUDA graph (tw/runtime/graph.py) and replayed: every replay
    gives the reference's output (the P2P epochs live on the device, so replays stay in step)."""
    from tw.runtime.graph import Graph
    stream = world.new_stream()
    m = strat.model
    g = Graph(lambda: strat.forward(plan, stream), stream)
    rows = slice(plan.parts[0].offset, plan.parts[-1].offset + plan.parts[-1].num_tokens)
    for k in range(replays):
        m.ws.x[rows] = 0  # a replay that did nothing would leave the zeros
        stream.synchronize()
        g()
        stream.synchronize()
        strat.comm.check()
        err = reference.rel_err(m.ws.x[rows], ref)["rel_err"]
        assert err <= tol, f"{strat.name} graph replay {k} on {b}: rel_err {err:.3e} > {tol}"
    world.print0(f"PASS {strat.name:<8} under a CUDA graph, {replays} replays")


def check_tp1_equals_tpn(world, cfg, b, seed=2):
    """The same weights at TP=N and TP=1 give the same output within the dtype's tolerance. MoE: the two
    runs' GEMM shapes differ, so a near-tie token may route differently (and, through attention, move
    its sequence's later tokens): each run is compared with the float64 reference that follows its
    own routing at near-ties (every other token must route as the reference does), and the tokens
    routed differently are counted."""
    ids = batching.token_ids(b.num_tokens, cfg.vocab, seed)
    outs, routings = [], []
    for w in (world, world.sub(1)):
        model = Model(cfg, w, b.num_tokens, b.kv_capacity, seed=seed)
        model.routing = {} if cfg.num_experts else None
        strat = schedules.make("fused" if world.shared_gpu else "nccl", model, w)  # NCCL: one rank per GPU
        outs.append(to_host(strat.forward(strat.prepare(b, ids))).astype(np.float64))
        tol = reference.tolerance(model.dtype)
        if cfg.num_experts:
            ref = to_host(reference.forward_once(world, cfg, b, ids, seed, model.xp, model.dtype,
                                                 model.routing if world.rank == 0 else None))
            err = reference.rel_err(outs[-1], ref)["rel_err"]
            assert err <= tol, f"TP={w.tp_size} vs its routed float64 reference: rel_err {err:.3e} > {tol}"
            routings.append(model.routing)
        del model, strat
    if cfg.num_experts:
        n = b.num_tokens
        moved = sum(int((np.sort(routings[0][i][:n], 1) != np.sort(routings[1][i][:n], 1)).any(1).sum())
                    for i in routings[0])
        world.print0(f"PASS TP={world.tp_size} and TP=1 each match the float64 reference on {b} (MoE: "
                     f"{moved} token-layer routings differ between them, all near-ties)")
        return
    err = reference.rel_err(outs[0], outs[1])
    assert err["rel_err"] <= tol, f"TP={world.tp_size} vs TP=1: rel_err {err['rel_err']:.3e} > {tol}"
    world.print0(f"PASS TP={world.tp_size} equals TP=1 on {b}: rel_err {err['rel_err']:.2e} (tol {tol})")


def check_comm_exact(world, kind):
    """Rank- and row-encoded data through all_reduce and ar_add_norm's reduction: exact sums.

    Rank r holds v = (3 row + col + 5 r) mod 8 at (row, col): a pattern of row, column and rank, so a
    missing, doubled or shifted contribution changes the sum. Every partial sum is an integer <= 7 * N
    (<= 56 for 8 ranks), exact in bf16 (8 significant bits) and fp32, in any reduction order.
    """
    hidden, max_tokens = 64, 37
    xp = np
    dtype = np.dtype(np.float32)
    if world.is_gpu:
        import cupy as xp
        from tw.ops import BF16 as dtype
    comm = transports.make(kind, world, hidden, max_tokens, dtype)
    r, n = world.tp_rank, world.tp_size
    for start, end in ((0, max_tokens), (5, 6), (3, 30), (11, 37)):
        rows, cols = np.arange(max_tokens)[:, None], np.arange(hidden)[None, :]
        host = ((3 * rows + cols + 5 * r) % 8).astype(np.float32)
        total = sum((3 * rows + cols + 5 * k) % 8 for k in range(n)).astype(np.float64)  # [rows, hidden]
        buf = comm.staging(max_tokens)
        buf[...] = xp.asarray(host).astype(dtype)
        comm.all_reduce(start, end)
        got = to_host(buf[start:end]).astype(np.float64)
        want = total[start:end]
        assert np.array_equal(got, want), \
            f"{kind} all_reduce [{start},{end}) rank {r}: max err {np.abs(got - want).max()}"
        # Sharded and unsharded ar_add_norm give the same normed rows, and own residual rows = sum + res.
        outs = []
        for sharded in (False, True):
            buf[...] = xp.asarray(host).astype(dtype)
            residual = xp.asarray(np.full((max_tokens, hidden), 3.0, np.float32)).astype(dtype)
            out = xp.zeros((max_tokens, hidden), dtype)
            weight = xp.ones(hidden, dtype)
            comm.ar_add_norm(start, end, residual, weight, 1e-5, out, sharded=sharded)
            lo, hi = owned_rows(start, end, r, n) if sharded else (start, end)
            res = to_host(residual[lo:hi]).astype(np.float64)
            assert np.array_equal(res, total[lo:hi] + 3.0), f"{kind} residual rows, sharded={sharded}"
            outs.append(to_host(out[start:end]).astype(np.float64))
        assert np.array_equal(outs[0], outs[1]), f"{kind}: sharded and unsharded ar_add_norm differ"
    if world.is_gpu:
        xp.cuda.get_current_stream().synchronize()
    world.print0(f"PASS {kind} transport contract, tp={n}, rank-encoded data exact")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="tiny")
    p.add_argument("--strategies", nargs="+", default=["nccl", "fused", "finegrained2", "tokenweave"])
    p.add_argument("--quick", action="store_true", help="one batch only")
    args = p.parse_args()
    world = dist.init(None, args.device)
    cfg = config.get(args.model)
    n = world.tp_size
    batches = [batching.mixed([(37, 0), (1, 20), (23, 9), (5, 0)]),   # prefill, decode, chunked, short
               batching.prefill(64 + n - 1, 32)]                        # not divisible by TP
    if args.quick:
        batches = batches[:1]
    strategies = args.strategies
    if world.shared_gpu:  # NCCL refuses two ranks on one GPU: check the P2P transport instead
        strategies = [s for s in strategies if s != "nccl" and not s.startswith("finegrained")]
        world.print0(f"TW_SHARE_GPU=1: NCCL strategies skipped, checking {strategies}")
    check_comm_exact(world, "p2p" if world.shared_gpu else "nccl")
    if world.is_gpu and not world.shared_gpu and world.tp_size > 1:
        check_comm_exact(world, "p2p")
    check_strategies(world, cfg, strategies, batches)
    check_tp1_equals_tpn(world, cfg, batches[0])
    world.print0("ALL PASS")
    dist.shutdown(0)


if __name__ == "__main__":
    main()
