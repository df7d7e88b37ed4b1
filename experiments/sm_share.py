"""What k busy SMs cost a GEMM, and whether telling cuBLAS helps: every layer GEMM of a model's TP
shard, alone and beside a kernel holding k SMs, with and without the cuBLAS SM-count target. One GPU.

    python -m experiments.sm_share --models llama3-70b qwen2.5-72b --shard-tp 2 8 --held 8 16

The k SMs are held by k CTAs that spin and take all of their SM's shared memory (tw/bench.hold_sms), so
no GEMM CTA fits there: a comm kernel's SM share without its memory traffic. With --beside norm the
GEMMs run instead beside the real local add + RMSNorm kernel of the copy-engine transport (a one-rank
CeComm: no copies, only its k-CTA kernel, on --norm-rows rows, launched back to back so it outlasts the
GEMMs): SM share plus its HBM traffic (rows kind=norm). --beside pairs holds the k SMs as k/2 clusters
of 2 CTAs (rows kind=pairs): cuBLAS's Hopper GEMMs run 2-CTA clusters, and single held SMs may strand
their cluster partners. Per model, shard (TP
degree whose shard shapes are used), GEMM (qkv, o_proj, gate_up, down: out[M, N] = x[M, K] w[N, K]^T)
and M rows: alone_ms (no SM held, no target), then for every k and target: ms beside k held SMs.
Targets: off (none), left (SMs - k), half (SMs - k/2); the row k = 0, target left_of_8 is the target
SMs - 8 set while nothing is held (what the target costs a GEMM that does not overlap a comm kernel).

Columns: slowdown = ms / alone_ms; bound = SMs / (SMs - k) (the slowdown if the GEMM lost exactly
the held SMs); excess = (slowdown - 1) / (bound - 1) (1: exactly the SM share; the target of
docs/design.md#targets is <= 1.2). Timing: each sample starts after a device sync; the holder is
launched first, the GEMMs are queued behind a 0.3 ms hold on their own stream (so the holder's CTAs are
resident first and host gaps stay out), CUDA events around --reps back-to-back GEMMs; round-robin over
the configurations of one (GEMM, M) for --iters rounds (tw/measure/bench.py), median.
"""
from __future__ import annotations

import numpy as np

from experiments import common
from tw import ops
from tw.measure import bench
from tw.model import config
from tw.runtime import dist

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
    p.add_argument("--beside", nargs="+", choices=("held", "pairs", "norm"), default=["held"],
                   help="what runs beside the GEMMs: held SMs (spinning CTAs), held SMs as 2-CTA clusters "
                        "(pairs in a GPC; even k only) and/or the CE transport's norm kernel")
    p.add_argument("--norm-rows", type=int, default=4096, help="rows of each norm call (--beside norm)")
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
    if "pairs" in args.beside and any(k % 2 for k in args.held):
        raise dist.UsageError(f"--beside pairs holds SMs in pairs: every --held must be even, got {args.held}")
    world = common.init(args, gpu_only="it times cuBLAS GEMMs beside SMs held by a kernel")
    if world.size > 1:
        raise dist.UsageError("experiments.sm_share runs on one GPU: start it without mpirun")
    import cupy as cp
    sms = world.sm_count
    writer = common.writer(args, world, "sm_share")
    compute = cp.cuda.Stream(non_blocking=True)
    side = cp.cuda.Stream(non_blocking=True)
    m_max = max(args.tokens)
    norm = make_norm(world, args.norm_rows, side) if "norm" in args.beside else None
    world.print0(f"{world.gpu_name}, {sms} SMs -> {writer.path}")
    world.print0(f"{'model':>12} {'tp':>2} {'gemm':>7} {'M':>6} {'k':>3} {'target':>6} {'kind':>5} {'alone_ms':>8} {'ms':>8} "
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
                    measure_point(args, world, writer, compute, side, name, tp, gemm, x[:m], w, out[:m], sms, norm)
                del x, w, out
                cp.get_default_memory_pool().free_all_blocks()
    world.print0(f"wrote {writer.path}")
    return 0


def make_norm(world, rows, stream, hidden=8192):
    """fn(k, count): `count` back-to-back calls of the CE transport's local add + RMSNorm kernel with k
    CTAs on `rows` rows of random data (a one-rank CeComm: no copies), on `stream`; and its ms per call."""
    import cupy as cp
    from tw import comm as transports
    ce = transports.make("ce", world, hidden, rows, ops.BF16)
    ce.staging(rows)[...] = cp.random.standard_normal((rows, hidden), dtype=cp.float32).astype(ops.BF16)
    residual = cp.random.standard_normal((rows, hidden), dtype=cp.float32).astype(ops.BF16)
    weight = cp.ones(hidden, dtype=ops.BF16)
    out = ce.output(rows)

    def run(k, count):
        for _ in range(count):
            ce.ar_add_norm(0, rows, residual, weight, 1e-5, out, stream=stream, ctas=k)

    return run


def measure_point(args, world, writer, compute, side, model, tp, gemm, x, w, out, sms, norm=None):
    import cupy as cp
    m = x.shape[0]

    def run(target):
        for _ in range(args.reps):
            ops.linear(x, w, out, compute, target)

    configs = [(0, "off", "held"), (0, "left_of_8", "held")] + [(k, t, b) for b in args.beside for k in args.held
                                                                 for t in args.targets]
    ev = [cp.cuda.Event(), cp.cuda.Event()]
    rough = {}

    def sample(config):
        k, t, beside = config
        target = sms - 8 if t == "left_of_8" else target_value(t, k, sms)
        cp.cuda.Device().synchronize()
        if k and beside in ("held", "pairs"):
            hold_us = 300 + 2 * rough.get("alone", 1.0) * 1e3  # outlasts the GEMMs even at 2x slower
            bench.hold_sms(side, k, hold_us, cluster=2 if beside == "pairs" else 1)
        elif k:  # enough norm calls to outlast the GEMMs at 2x slower
            norm(k, max(1, int(2 * rough["alone"] / rough[("norm", k)]) + 1))
        bench.hold(compute, 300)
        ev[0].record(compute)
        run(target)
        ev[1].record(compute)
        ev[1].synchronize()
        return [cp.cuda.get_elapsed_time(ev[0], ev[1]) / args.reps]

    rough["alone"] = float(np.median([sample((0, "off", "held"))[0] * args.reps for _ in range(3)]))  # warm-up too
    for k in (args.held if "norm" in args.beside else []):
        if ("norm", k) not in rough:
            norm(k, 2)  # warm-up (compiles the kernel once)
            e = (cp.cuda.Event(), cp.cuda.Event())
            e[0].record(side)
            norm(k, 5)
            e[1].record(side)
            e[1].synchronize()
            rough[("norm", k)] = cp.cuda.get_elapsed_time(*e) / 5
    with dist.step(f"sm_share {model} tp{tp} {gemm} M={m}"):
        samples = bench.round_robin(configs, sample, args.iters)
    med = {c: float(np.median(s)) for c, s in samples.items()}
    alone = med[(0, "off", "held")]
    flops = 2 * m * w.shape[0] * w.shape[1]
    for (k, t, beside), ms in med.items():
        if (k, t) == (0, "off"):
            continue
        bound = sms / (sms - k) if k else 1.0
        slowdown = ms / alone
        row = {"model": model, "shard_tp": tp, "gemm": gemm, "tokens": m, "n": w.shape[0], "k_dim": w.shape[1],
               "held": k, "target": t, "kind": beside if k else "alone",
               "norm_ms": rough.get(("norm", k)) if beside == "norm" else None, "sm_target": sms - 8 if t == "left_of_8" else target_value(t, k, sms),
               "alone_ms": alone, "ms": ms, "slowdown": slowdown, "bound": bound,
               "excess": (slowdown - 1) / (bound - 1) if k else None, "alone_tflops": flops / alone / 1e9,
               "reps": args.reps, "iters": args.iters,
               # the holder must outlast the GEMMs, or the slowdown is understated
               "holder_outlasted": bool(not k or ms * args.reps <= 2 * rough["alone"])}
        if beside == "norm":  # the k-CTA norm kernel's own share of the SMs is the same bound
            row["kind"] = "norm"
        writer.write(row)
        ex = f"{row['excess']:6.2f}" if k else "     -"
        world.print0(f"{model:>12} {tp:>2} {gemm:>7} {m:>6} {k:>3} {t:>6} {beside if k else '':>5} {alone:>8.3f} {ms:>8.3f} "
                     f"{slowdown:>8.3f} {bound:>6.3f} {ex}")


if __name__ == "__main__":
    dist.shutdown(main())
