"""What k busy SMs cost a GEMM, and whether telling cuBLAS helps: every layer GEMM of a model's TP
shard, alone and beside a kernel holding k SMs, with and without the cuBLAS SM-count target. One GPU.

    python -m experiments.sm_share --models llama3-70b qwen2.5-72b --shard-tp 2 8 --held 8 16

The k SMs are held by k CTAs that spin and take all of their SM's shared memory (tw/bench.hold_sms), so
no GEMM CTA fits there: a comm kernel's SM share without its memory traffic. Per model, shard (TP
degree whose shard shapes are used), GEMM (qkv, o_proj, gate_up, down: out[M, N] = x[M, K] w[N, K]^T)
and M rows: alone_ms (no SM held, no target), then for every k and target: ms beside k held SMs.
Targets: off (none), left (SMs - k), half (SMs - k/2); the row k = 0, target left_of_8 is the target
SMs - 8 set while nothing is held (what the target costs a GEMM that does not overlap a comm kernel).

Columns: slowdown = ms / alone_ms; bound = SMs / (SMs - k) (the slowdown if the GEMM lost exactly
the held SMs); excess = (slowdown - 1) / (bound - 1) (1: exactly the SM share; the target of
docs/design.md#targets is <= 1.2). Timing: each sample starts after a device sync; the holder is
launched first, the GEMMs are queued behind a 0.3 ms hold on their own stream (so the holder's CTAs are
resident first and host gaps stay out), CUDA events around --reps back-to-back GEMMs; round-robin over
the configurations of one (GEMM, M) for --iters rounds (tw/bench.py), median.
"""
from __future__ import annotations

import numpy as np

from experiments import common
from tw import bench, config, dist, ops

TARGETS = ("off", "left", "half")


def parse_args(argv=None):
    p = common.parser("sm_share", __doc__)
    p.add_argument("--models", nargs="+", default=["llama3-70b", "qwen2.5-72b"], help="model presets")
    p.add_argument("--shard-tp", type=int, nargs="+", default=[2, 8], help="TP degrees whose shard shapes are timed")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384], help="rows M")
    p.add_argument("--held", type=int, nargs="+", default=[8, 16], help="SMs held beside the GEMM (k)")
    p.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS), help="SM-count targets tried")
    p.add_argument("--gemms", nargs="+", choices=("qkv", "o_proj", "gate_up", "down"),
                   default=["qkv", "o_proj", "gate_up", "down"], help="which layer GEMMs")
    p.add_argument("--reps", type=int, default=3, help="GEMMs back to back per sample")
    p.add_argument("--iters", type=int, default=7, help="rounds (one sample of every configuration each)")
    common.add_run_flags(p, tp=False)
    return p.parse_args(argv)


def shapes(cfg, tp):
    """{name: (N, K)} of the four layer GEMMs of one TP rank's shard."""
    s = config.ShardConfig(cfg, tp, 0)
    h = cfg.hidden
    return {"qkv": (s.qkv_dim, h), "o_proj": (h, s.q_dim), "gate_up": (2 * s.ffn, h), "down": (h, s.ffn)}


def target_value(name, k, sms):
    return {"off": None, "left": sms - k, "half": sms - k // 2}[name]


def main(argv=None):
    args = parse_args(argv)
    world = common.init(args, gpu_only="it times cuBLAS GEMMs beside SMs held by a kernel")
    if world.size > 1:
        raise dist.UsageError("experiments.sm_share runs on one GPU: start it without mpirun")
    import cupy as cp
    sms = world.sm_count
    writer = common.writer(args, world, "sm_share")
    compute = cp.cuda.Stream(non_blocking=True)
    side = cp.cuda.Stream(non_blocking=True)
    m_max = max(args.tokens)
    world.print0(f"{world.gpu_name}, {sms} SMs -> {writer.path}")
    world.print0(f"{'model':>12} {'tp':>2} {'gemm':>7} {'M':>6} {'k':>3} {'target':>6} {'alone_ms':>8} {'ms':>8} "
                 f"{'slowdown':>8} {'bound':>6} {'excess':>6}")
    for name in args.models:
        cfg = config.get(name, 1)
        for tp in args.shard_tp:
            for gemm, (n, k_dim) in shapes(cfg, tp).items():
                if gemm not in args.gemms:
                    continue
                x = cp.random.standard_normal((m_max, k_dim), dtype=cp.float32).astype(ops.BF16)
                w = (cp.random.standard_normal((n, k_dim), dtype=cp.float32) / np.sqrt(k_dim)).astype(ops.BF16)
                out = cp.empty((m_max, n), dtype=ops.BF16)
                for m in args.tokens:
                    measure_point(args, world, writer, compute, side, name, tp, gemm, x[:m], w, out[:m], sms)
                del x, w, out
                cp.get_default_memory_pool().free_all_blocks()
    world.print0(f"wrote {writer.path}")
    return 0


def measure_point(args, world, writer, compute, side, model, tp, gemm, x, w, out, sms):
    import cupy as cp
    m = x.shape[0]

    def run(target):
        with ops.sm_target(target):
            for _ in range(args.reps):
                ops.linear(x, w, out, compute)

    configs = [(0, "off"), (0, "left_of_8")] + [(k, t) for k in args.held for t in args.targets]
    ev = [cp.cuda.Event(), cp.cuda.Event()]
    rough = {}

    def sample(config):
        k, t = config
        target = sms - 8 if t == "left_of_8" else target_value(t, k, sms)
        cp.cuda.Device().synchronize()
        if k:
            hold_us = 300 + 2 * rough.get("alone", 1.0) * 1e3  # outlasts the GEMMs even at 2x slower
            bench.hold_sms(side, k, hold_us)
        bench.hold(compute, 300)
        ev[0].record(compute)
        run(target)
        ev[1].record(compute)
        ev[1].synchronize()
        return [cp.cuda.get_elapsed_time(ev[0], ev[1]) / args.reps]

    rough["alone"] = float(np.median([sample((0, "off"))[0] * args.reps for _ in range(3)]))  # warm-up too
    with dist.step(f"sm_share {model} tp{tp} {gemm} M={m}"):
        samples = bench.round_robin(configs, sample, args.iters)
    med = {c: float(np.median(s)) for c, s in samples.items()}
    alone = med[(0, "off")]
    flops = 2 * m * w.shape[0] * w.shape[1]
    for (k, t), ms in med.items():
        if (k, t) == (0, "off"):
            continue
        bound = sms / (sms - k) if k else 1.0
        slowdown = ms / alone
        row = {"model": model, "shard_tp": tp, "gemm": gemm, "tokens": m, "n": w.shape[0], "k_dim": w.shape[1],
               "held": k, "target": t, "sm_target": sms - 8 if t == "left_of_8" else target_value(t, k, sms),
               "alone_ms": alone, "ms": ms, "slowdown": slowdown, "bound": bound,
               "excess": (slowdown - 1) / (bound - 1) if k else None, "alone_tflops": flops / alone / 1e9,
               "reps": args.reps, "iters": args.iters,
               # the holder must outlast the GEMMs, or the slowdown is understated
               "holder_outlasted": bool(not k or ms * args.reps <= 2 * rough["alone"])}
        writer.write(row)
        ex = f"{row['excess']:6.2f}" if k else "     -"
        world.print0(f"{model:>12} {tp:>2} {gemm:>7} {m:>6} {k:>3} {t:>6} {alone:>8.3f} {ms:>8.3f} "
                     f"{slowdown:>8.3f} {bound:>6.3f} {ex}")


if __name__ == "__main__":
    dist.shutdown(main())
