"""The MoE block on one GPU, phase by phase: routing kernels, expert GEMMs (a loop of cuBLAS GEMMs vs
one cuBLAS grouped GEMM per projection), and the expert GEMMs' rate against dense GEMMs of the same
per-expert M. One GPU, one rank.

    python -m experiments.moe                                   # mixtral-8x22b TP=1 shapes, 1K-16K tokens
    python -m experiments.moe --shard-tp 8 --tokens 4096        # the expert shards of TP=8

Data: layer 0 of the seeded model (router and experts, --shard-tp's shard), x = random N(0, 1) rows (what
an RMSNorm output looks like), so the routing is the seeded random router's: close to balanced, unlike a
trained model's (imbalance is reported). Each configuration is timed --iters times per round over
--rounds rounds (round-robin, tw/measure/bench.py), median, CUDA events on one stream.

Columns (rows carry the same names): tokens; mode (loop / grouped); imbalance = the largest expert's rows
/ the mean (n k / E); router_ms (router GEMM with float32 logits + top-k softmax), permute_ms (permutation
+ row gather), gather = gather_ms (the row gather alone, part of permute_ms), unpermute_ms; readback_ms =
what the block's host wait for the row counts adds, measured as a whole block minus its parts on the GPU
stream (the row gather runs during the wait, so this is the exposed rest, host launch gap after the wait
included; ~0 when the gather outlasts it);
experts_ms (gate_up GEMMs, SiLU * mul, down GEMMs); act_ms (the SiLU * mul alone); block_ms (the whole
block, tw/moe.moe_forward); routing% = (router + permute + unpermute + readback) / block (target < 10%);
tflops = expert GEMM flops / (experts_ms - act_ms); dense_tflops = the same two GEMMs at M = the mean
rows per expert, one dense GEMM each, summed over E experts' worth of rows; vs_dense = tflops /
dense_tflops (target >= 0.6 from 4K tokens).
"""
from __future__ import annotations

import numpy as np

from experiments import common
from tw import ops
from tw.measure import bench
from tw.model import config, moe, weights
from tw.runtime import dist
from tw.ops import moe as moe_ops


def parse_args(argv=None):
    p = common.parser("moe", __doc__)
    p.add_argument("--model", default="mixtral-8x22b", help="an MoE preset")
    p.add_argument("--shard-tp", type=int, default=1, help="TP degree whose expert shards are timed")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384], help="tokens n")
    p.add_argument("--modes", nargs="+", choices=moe.GEMM_MODES, default=list(moe.GEMM_MODES),
                   help="expert GEMMs: loop = one cuBLAS GEMM per expert; grouped = cublasGemmGroupedBatchedEx")
    p.add_argument("--iters", type=int, default=10, help="timed calls per configuration and round")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and x")
    common.add_run_flags(p, tp=False)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.model not in config.PRESETS or not config.PRESETS[args.model].num_experts:
        moes = sorted(n for n, c in config.PRESETS.items() if c.num_experts)
        raise dist.UsageError(f"--model {args.model!r} is not an MoE preset; choose one of {moes}")
    cfg = config.PRESETS[args.model]
    if args.shard_tp not in config.valid_tp(cfg):
        raise dist.UsageError(f"--shard-tp {args.shard_tp}: {cfg.name} shards at TP {config.valid_tp(cfg)}")
    if min(args.tokens) < 1 or args.iters < 1 or args.rounds < 1 or args.warmup < 0:
        raise dist.UsageError("--tokens, --iters and --rounds must be >= 1, --warmup >= 0")
    world = common.init(args, gpu_only="it times the GPU MoE block")
    import cupy as cp
    dt, k, e = ops.BF16, cfg.top_k, cfg.num_experts
    shard = config.ShardConfig(cfg, args.shard_tp, 0)
    w = weights.shard_layer(weights.full_layer(cfg, 0, args.seed, cp), shard)
    mw = moe.MoEWeights(w["router"].astype(dt), w["experts_gate_up"].astype(dt), w["experts_down"].astype(dt))
    del w
    h, f, t_max = cfg.hidden, shard.ffn, max(args.tokens)
    bufs = moe.MoEBuffers.allocate(cp, t_max, h, f, e, k, dt)
    x_all = cp.random.default_rng(args.seed).standard_normal((t_max, h), dtype=cp.float32).astype(dt)
    y_all = cp.zeros((t_max, h), dt)
    stream = cp.cuda.Stream(non_blocking=True)
    cp.cuda.Device().synchronize()
    writer = common.writer(args, world, "moe", cfg, shard_tp=args.shard_tp)
    print(f"{cfg.name} experts of TP={args.shard_tp} ({e} experts, top-{k}, H={h}, F/tp={f}), {world.gpu_name}")
    print(f"{'tokens':>6} {'mode':<8} {'imbal':>6} {'router':>7} {'permute':>7} {'gather':>7} {'unperm':>7} {'readbk':>7} "
          f"{'experts':>8} {'block':>8} {'routing%':>8} {'tflops':>7} {'dense':>7} {'vs_dense':>8}")
    for n in args.tokens:
        x, y, b = x_all[:n], y_all[:n], bufs.rows(0, n, k)
        with stream:
            counts = moe.moe_forward(x, mw, k, b, y, stream=stream)
        stream.synchronize()
        offsets = np.concatenate([[0], np.cumsum(counts)])
        spans = [(i, int(offsets[i]), int(offsets[i + 1])) for i in range(e) if counts[i]]
        mean_rows = n * k / e
        flops = 2 * n * k * h * 3 * f
        m_dense = max(1, int(round(mean_rows)))

        def router():
            moe.route_gpu(x, mw, k, b, stream)

        def permute():
            moe.permute_gpu(x, mw, b, stream)

        def gather():
            moe_ops.gather_rows(x, b.source, b.xs, stream)

        def unpermute():
            moe.unpermute_gpu(b, y, stream)

        def act():
            ops.silu_mul(b.gate_up[:n * k], b.act[:n * k], stream)

        def dense():   # E experts' worth of rows, as E GEMMs of the mean rows each
            for _ in range(e):
                ops.linear(b.xs[:m_dense], mw.gate_up[0], b.gate_up[:m_dense], stream)
                ops.linear(b.act[:m_dense], mw.down[0], b.out[:m_dense], stream)

        fns = {"router": router, "permute": permute, "gather": gather, "unpermute": unpermute, "act": act,
               "dense": dense}
        for mode in args.modes:
            fns[f"experts:{mode}"] = lambda mode=mode: moe._expert_gemms(b, mw, offsets, "", stream, gemm_mode=mode)
            fns[f"block:{mode}"] = lambda mode=mode: moe.moe_forward(x, mw, k, b, y, stream=stream, gemm_mode=mode)
        with dist.step(f"moe: {n} tokens"):
            ms = {name: s["median_ms"] for name, s in
                  bench.timed(fns, world, stream, args.iters, args.warmup, args.rounds).items()}
        dense_tflops = 2 * e * m_dense * h * 3 * f / (ms["dense"] * 1e-3) / 1e12
        for mode in args.modes:
            routing = ms["router"] + ms["permute"] + ms["unpermute"]
            readback = ms[f"block:{mode}"] - routing - ms[f"experts:{mode}"]
            tflops = flops / ((ms[f"experts:{mode}"] - ms["act"]) * 1e-3) / 1e12
            row = {"tokens": n, "mode": mode, "imbalance": float(counts.max() / mean_rows),
                   "rows_per_expert": counts.tolist(), "router_ms": ms["router"], "permute_ms": ms["permute"],
                   "gather_ms": ms["gather"], "unpermute_ms": ms["unpermute"], "readback_ms": readback, "experts_ms": ms[f"experts:{mode}"],
                   "act_ms": ms["act"], "block_ms": ms[f"block:{mode}"],
                   "routing_share": (routing + readback) / ms[f"block:{mode}"], "expert_gemm_flops": flops,
                   "tflops": tflops, "dense_m": m_dense, "dense_ms": ms["dense"], "dense_tflops": dense_tflops,
                   "vs_dense": tflops / dense_tflops, "groups": len(spans), "iters": args.iters,
                   "rounds": args.rounds}
            writer.write(row)
            print(f"{n:>6} {mode:<8} {row['imbalance']:>6.2f} {ms['router']:>7.3f} {ms['permute']:>7.3f} "
                  f"{ms['gather']:>7.3f} {ms['unpermute']:>7.3f} {readback:>7.3f} {row['experts_ms']:>8.3f} {row['block_ms']:>8.3f} "
                  f"{100 * row['routing_share']:>7.1f}% {tflops:>7.1f} {dense_tflops:>7.1f} {row['vs_dense']:>8.3f}")
    print(f"wrote {writer.path}")
    return 0


if __name__ == "__main__":
    dist.shutdown(main())
