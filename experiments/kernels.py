"""Kernel benchmarks: the fused AllReduce + residual-add + RMSNorm against NCCL (the paper's Table 1 and
Figures 4-7, 10 on our hardware).

    mpirun -n 2 python -m experiments.kernels [--quick] [--out FILE]

For every hidden size and token count (powers of 2) it measures, in one run:
    nccl_ar          NCCL all-reduce alone (the reference the targets are stated against)
    nccl_ar_norm     NCCL all-reduce, then the fused add + RMSNorm kernel on all rows (vLLM's order)
    nccl_rs_norm_ag  NCCL reduce-scatter -> add + RMSNorm on 1/TP of the rows -> NCCL all-gather
    p2p_ar           P2P all-reduce (one kernel; one-shot at <= oneshot_max_tokens rows, else two-shot)
    p2p_fused        P2P fused AR + add + RMSNorm, sharded, result pushed into the registered output
    p2p_fused_copy   the same with a private `out` (results land in staging, then a local copy)
    p2p_fused_simple the "simple fusion": RS, norm, AG as three phases with a wait for EVERY peer CTA
                     between phases (sync_all), instead of the CTA-pair pipelining of p2p_fused
    p2p_fused_2shot  two-shot forced at small sizes (to place the one-shot threshold)
and a CTA sweep (1..132) of p2p_fused and p2p_ar at a few sizes.

Timing: each op is captured N times back-to-back in one CUDA graph (so host launch overhead is not
timed), the graph is replayed --iters times after warm-up with CUDA events; time_us = the median
replay / N, the slowest rank (tw.measure.bench.summarize over the TP group).
Floor (P2P two-shot variants): sm_bytes = bytes this rank's SMs read or write (see sm_bytes());
floor_us = sm_bytes / (ctas x the per-SM copy rate measured by experiments.sm_rate, committed in
experiments/results/sm_rate-H200.jsonl); vs_floor = time_us / floor_us (docs/design.md#targets: <= 1.1).
Bandwidth (nccl-tests' definitions): bytes = tokens * hidden * 2 (the bf16 tensor being reduced);
algbw_gbps = bytes / time; busbw_gbps = algbw * 2 (n - 1) / n for all-reduce-shaped ops (n = TP).
For TP = 2 and the two-shot P2P kernels, each GPU sends bytes / 2 of partials and bytes / 2 of
results, so algbw is exactly the NVLink throughput per direction.
Correctness: every measured variant runs once on fresh random data (every rank regenerates all ranks'
inputs from shared seeds). All-reduces: vs the fp32 sum on the GPU; fused ops: vs a float64 NumPy
reference on 256 sampled rows. Relative norm error <= 1e-2 (bf16 output rounding is ~1e-3). Column
`correct`, with the error in `rel_err`.
"""
from __future__ import annotations

import numpy as np

from experiments import common, emulated
from tw.measure import bench
from tw.runtime import dist, graph
from tw.runtime.arrays import bf16_from_f32, f32_from_bf16

TOL = 1e-2
SM_RATE_FILE = "sm_rate-H200.jsonl"  # experiments/results/: the measured per-SM copy rate (experiments.sm_rate)


def sm_bytes(kernel: str, n: int, hidden: int, tp: int) -> int | None:
    """Bytes the SMs of ONE rank read or write in a P2P variant (None for NCCL: its SM use is not ours
    to count). Per rank, R = hidden * 2 bytes a row, n / tp owned rows: push the others' rows of my
    staging, 2 (tp - 1) n/tp R; read my own staging rows, tp - 1 received partials and the residual,
    (tp + 1) n/tp R; write residual and out, 2 n/tp R; push out to the tp - 1 peers, (tp - 1) n/tp R:
    4 n R in all (64 KiB per 16 KiB row at TP=2). The all-reduce (no residual, one write) moves
    (4 tp - 2) n/tp R; a private `out` adds the local copy of every row, 2 n R. One-shot variants are
    not counted (None)."""
    r = hidden * 2
    fused = 4 * n * r
    table = {"p2p_fused": fused, "p2p_fused_simple": fused, "p2p_fused_2shot": fused,
             "p2p_fused_copy": fused + 2 * n * r, "p2p_ar": (4 * tp - 2) * n * r // tp}
    return table.get(kernel)


def per_sm_gbps() -> tuple[float | None, str]:
    """The median GB/s per SM at 1-8 CTAs from the committed sm_rate file, and where it came from."""
    from tw.measure.results import RESULTS_DIR, read
    path = RESULTS_DIR / SM_RATE_FILE
    if not path.exists():
        return None, "no sm_rate file"
    rows = [r for r in read(path) if 1 <= r["ctas"] <= 8 and r.get("correct")]
    return (float(np.median([r["gbps_per_sm"] for r in rows])), SM_RATE_FILE) if rows else (None, "empty sm_rate file")


def parse_args(argv=None):
    p = common.parser("kernels", __doc__)
    p.add_argument("--hidden", type=int, nargs="+", default=[8192, 6144], help="row widths (bf16 elements)")
    p.add_argument("--tokens", type=int, nargs="+", default=[2 ** k for k in range(6, 16)],
                   help="token counts (64 .. 32768)")
    p.add_argument("--ctas", type=int, default=8, help="CTA budget of the P2P kernels in the main table")
    p.add_argument("--sweep-ctas", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 132],
                   help="CTA counts of the sweep")
    p.add_argument("--sweep-tokens", type=int, nargs="+", default=[64, 1024, 8192, 32768],
                   help="token counts of the CTA sweep (hidden = the first --hidden)")
    p.add_argument("--oneshot-max-tokens", type=int, default=256, help="P2P one-shot threshold (rows)")
    p.add_argument("--iters", type=int, default=20, help="timed graph replays")
    p.add_argument("--warmup", type=int, default=3, help="untimed graph replays")
    p.add_argument("--reps", type=int, default=10, help="ops captured back-to-back per graph")
    p.add_argument("--quick", action="store_true", help="a short run: fewer sizes, CTA counts, iterations")
    emulated.add_emulation_flags(p)
    common.add_run_flags(p, tp=False)
    a = p.parse_args(argv)
    if a.quick:
        a.hidden, a.tokens = a.hidden[:1], [64, 1024, 8192]
        a.sweep_ctas, a.sweep_tokens, a.iters = [2, 8, 32], [1024], 10
    return a


def randn_bf16(seed, shape):
    import cupy as cp
    return bf16_from_f32(cp.random.RandomState(seed).standard_normal(shape, dtype=cp.float32))


def rel_err(got_bf16, ref_f32) -> float:
    import cupy as cp
    g = f32_from_bf16(cp.ascontiguousarray(got_bf16))
    return float(cp.linalg.norm(g - ref_f32) / cp.linalg.norm(ref_f32))


def rel_err_rows(got_bf16, case) -> float:
    """Fused output vs the float64 reference on the case's sampled rows."""
    import cupy as cp
    g = f32_from_bf16(cp.ascontiguousarray(got_bf16[cp.asarray(case.rows)])).get().astype(np.float64)
    return float(np.linalg.norm(g - case.ref_y) / np.linalg.norm(case.ref_y))


class Case:
    """Inputs of one (tokens, hidden) size and its fp32 reference, shared by all variants. Emulated
    (pc an emulated P2PComm): the stand-in peers' partials of my rows go into my receive area, and the
    checks cover my own rows only (nobody computes the others')."""

    def __init__(self, world, n, hidden, eps=1e-5, tp=None, me=None, pc=None):
        import cupy as cp
        from tw.comm import owned_rows
        tp = world.tp_size if tp is None else tp
        me = world.tp_rank if me is None else me
        seed = n * 7 + hidden
        parts = [randn_bf16(seed + r, (n, hidden)) for r in range(tp)]
        self.part = parts[me]
        lo, hi = owned_rows(0, n, me, tp)
        if pc is not None and pc.emulate is not None:
            recv = pc.region(me, "recv")
            for k in range(tp):
                if k != me:
                    recv[k, :hi - lo] = parts[k][lo:hi]
        self.sum = sum(f32_from_bf16(p) for p in parts)                      # [n, hidden] fp32
        del parts
        self.res0 = randn_bf16(seed + 100, (n, hidden))
        self.weight = bf16_from_f32(1 + 0.1 * cp.random.RandomState(seed + 200).standard_normal(hidden, dtype=cp.float32))
        # float64 reference of the fused op on up to 256 sampled rows (first, last, evenly spaced); emulated:
        # of my own rows, the only ones computed.
        lo, hi = (lo, hi) if pc is not None and pc.emulate is not None else (0, n)
        self.rows = np.unique(np.linspace(lo, hi - 1, min(hi - lo, 256)).astype(np.int64))
        self.own = (lo, hi)
        idx = cp.asarray(self.rows)
        host = lambda x: f32_from_bf16(cp.ascontiguousarray(x[idx])).get().astype(np.float64)  # noqa: E731
        h = sum(host(randn_bf16(seed + r, (n, hidden))) for r in range(tp)) + host(self.res0)
        w = f32_from_bf16(self.weight).get().astype(np.float64)
        self.ref_y = h / np.sqrt(np.mean(h * h, axis=1, keepdims=True) + eps) * w
        cp.cuda.Device().synchronize()
        self.residual = self.res0.copy()
        self.out = cp.empty_like(self.res0)
        self.n, self.hidden, self.eps = n, hidden, eps


def variants(world, nc, pc, case, ctas, which):
    """(kernel, transport, ctas, fn(stream), check()) for the requested variant names."""
    n, c = case.n, case
    out_reg = pc.output(n) if pc is not None else None
    all_v = {
        "nccl_ar": ("nccl", None, lambda s: nc.all_reduce(0, n, stream=s), lambda: rel_err(nc.staging(n), c.sum)),
        "nccl_ar_norm": ("nccl", None, lambda s: nc.ar_add_norm(0, n, c.residual, c.weight, c.eps, c.out, stream=s, sharded=False),
                         lambda: rel_err_rows(c.out, c)),
        "nccl_rs_norm_ag": ("nccl", None, lambda s: nc.ar_add_norm(0, n, c.residual, c.weight, c.eps, c.out, stream=s, sharded=True),
                            lambda: rel_err_rows(c.out, c)),
        "p2p_ar": ("p2p", ctas, lambda s: pc.all_reduce(0, n, stream=s, ctas=ctas),
                   lambda: rel_err(pc.staging(n)[c.own[0]:c.own[1]], c.sum[c.own[0]:c.own[1]])),
        "p2p_fused": ("p2p", ctas, lambda s: pc.ar_add_norm(0, n, c.residual, c.weight, c.eps, out_reg, stream=s, ctas=ctas),
                      lambda: rel_err_rows(out_reg, c)),
        "p2p_fused_copy": ("p2p", ctas, lambda s: pc.ar_add_norm(0, n, c.residual, c.weight, c.eps, c.out, stream=s, ctas=ctas),
                           lambda: rel_err_rows(c.out, c)),
        "p2p_fused_simple": ("p2p", ctas, lambda s: pc.ar_add_norm(0, n, c.residual, c.weight, c.eps, out_reg, stream=s, ctas=ctas,
                                                                  oneshot=False, sync_all=True),
                             lambda: rel_err_rows(out_reg, c)),
        "p2p_fused_2shot": ("p2p", ctas, lambda s: pc.ar_add_norm(0, n, c.residual, c.weight, c.eps, out_reg, stream=s, ctas=ctas,
                                                                 oneshot=False),
                            lambda: rel_err_rows(out_reg, c)),
    }
    return [(k, *all_v[k]) for k in which]


def measure(world, a, kernel, transport, ctas, fn, check, case, nc, pc, tp=None):
    import cupy as cp
    stream = cp.cuda.Stream(non_blocking=True)
    n = case.n
    # Correctness: fresh inputs, one call, compare.
    with stream:
        (nc if transport == "nccl" else pc).staging(n)[...] = case.part
        case.residual[...] = case.res0
        fn(stream)
    stream.synchronize()
    if pc is not None:
        pc.check()
    err = check()
    errs = world.tp_comm.allgather(err)
    worst = max(errs)
    correct = bool(worst <= TOL)
    # Timing: reps calls per graph; fall back to eager launches if capture fails.
    reps = a.reps
    try:
        g = graph.Graph(lambda: [fn(stream) for _ in range(reps)], stream)
        run, graphed = g, True
    except Exception as e:  # noqa: BLE001 - record and go on eagerly
        world.print0(f"    graph capture failed for {kernel} ({type(e).__name__}: {e}); timing eager launches")
        run, graphed = (lambda: [fn(stream) for _ in range(reps)]), False
    world.tp_comm.Barrier()
    times = bench.time_gpu(run, iters=a.iters, warmup=a.warmup, stream=stream)
    if pc is not None:
        pc.check()
    st = bench.summarize(times / reps, world.tp_comm)
    t_us = st["median_ms"] * 1e3
    nbytes = n * case.hidden * 2
    algbw = nbytes / (t_us * 1e-6) / 1e9
    tp = tp or world.tp_size
    through = sm_bytes(kernel, n, case.hidden, tp)
    oneshot = bool(transport == "p2p" and n <= pc.oneshot_max_tokens and "2shot" not in kernel and "simple" not in kernel)
    rate, _ = per_sm_gbps()
    floor_us = through / (ctas * rate * 1e9) * 1e6 if through and ctas and rate and not oneshot else None
    return {"kernel": kernel, "transport": transport, "tokens": n, "hidden": case.hidden, "bytes": nbytes,
            "sm_bytes": through if not oneshot else None, "floor_us": floor_us,
            "vs_floor": t_us / floor_us if floor_us else None,
            "ctas": ctas if ctas is not None else 0, "time_us": round(t_us, 2), "min_us": round(st["min_ms"] * 1e3, 2),
            "max_us": round(st["max_ms"] * 1e3, 2), "algbw_gbps": round(algbw, 1),
            "busbw_gbps": round(algbw * 2 * (tp - 1) / tp, 1), "rel_err": worst, "correct": correct,
            "graph": graphed, "oneshot": oneshot}


def measure_all(world, a, todo, case, nc, pc, writer, tp=None) -> list:
    """Measure, write and print every variant of `todo` for one case; returns the rows. Emulated (tp
    given): no link is crossed, so no bandwidth is printed."""
    rows = []
    for kernel, transport, ctas, fn, check in todo:
        row = measure(world, a, kernel, transport, ctas, fn, check, case, nc, pc, tp=tp)
        row["sweep"] = not (case.n in a.tokens and (ctas is None or ctas == a.ctas))
        rows.append(row)
        writer.write(row)
        bw = "" if tp else f"{row['algbw_gbps']:6.1f} GB/s  "
        world.print0(f"  H={case.hidden:5d} n={case.n:6d} {kernel:17s} ctas={row['ctas']:3d} {row['time_us']:9.1f} us "
                     f"{bw}err={row['rel_err']:.1e} {'ok' if row['correct'] else 'WRONG'}"
                     + (f"  vs_floor={row['vs_floor']:.2f}" if row["vs_floor"] else ""))
    return rows


def main(argv=None):
    a = parse_args(argv)
    world = common.init(a, gpu_only="it times the P2P and NCCL kernels")
    emu = emulated.emulation(a)
    if emu is not None:
        return main_emulated(a, world, emu)
    if world.tp_size < 2:
        raise dist.UsageError("experiments.kernels measures communication: start one rank per GPU, at least 2 "
                              "(mpirun -n 2 python -m experiments.kernels)")
    import cupy as cp
    from tw.comm.nccl import NcclComm
    from tw.comm.p2p import P2PComm
    say = world.print0
    rate, source = per_sm_gbps()
    writer = common.writer(a, world, "kernels", reps_per_graph=a.reps, per_sm_gbps=rate, per_sm_gbps_source=source)
    path = writer.path
    say(f"kernels: TP={world.tp_size} on {world.gpu_name}; hidden {a.hidden}; tokens {a.tokens}; P2P ctas {a.ctas}; "
        f"-> {path}")
    rows = []
    main_v = ["nccl_ar", "nccl_ar_norm", "nccl_rs_norm_ag", "p2p_ar", "p2p_fused", "p2p_fused_copy", "p2p_fused_simple"]
    for hidden in a.hidden:
        max_tokens = max(a.tokens + (a.sweep_tokens if hidden == a.hidden[0] else []))
        nc = NcclComm(world, hidden, max_tokens)
        pc = P2PComm(world, hidden, max_tokens, oneshot_max_tokens=a.oneshot_max_tokens, **common.p2p_options(a))
        sizes = sorted(set(a.tokens) | (set(a.sweep_tokens) if hidden == a.hidden[0] else set()))
        for n in sizes:
            case = Case(world, n, hidden)
            todo = []
            if n in a.tokens:
                which = main_v + (["p2p_fused_2shot"] if n <= 4 * a.oneshot_max_tokens else [])
                todo += variants(world, nc, pc, case, a.ctas, which)
            if hidden == a.hidden[0] and n in a.sweep_tokens:
                for c in a.sweep_ctas:
                    if c == a.ctas and n in a.tokens:
                        continue
                    extra = ["p2p_fused_2shot"] if n <= a.oneshot_max_tokens else []
                    todo += variants(world, nc, pc, case, c, ["p2p_fused", "p2p_ar"] + extra)
            rows += measure_all(world, a, todo, case, nc, pc, writer)
            del case
            cp.get_default_memory_pool().free_all_blocks()
        pc.close()
    if world.rank == 0:
        print_tables(rows, a)
        print(f"wrote {len(rows)} rows to {path}")
    return 0


def main_emulated(a, world, emu):
    """The P2P variants as one emulated rank of TP=N (tw/comm/emulation.py): the kernels' SM-side cost with
    stand-in peers and no link. NCCL cannot run on one rank: its columns stay empty."""
    import cupy as cp
    from tw.comm.p2p import P2PComm
    say = world.print0
    rate, source = per_sm_gbps()
    writer = common.writer(a, world, "kernels", reps_per_graph=a.reps, per_sm_gbps=rate, per_sm_gbps_source=source)
    say(f"kernels: {emu.banner} (rank {emu.rank}) on {world.gpu_name}; hidden {a.hidden}; tokens {a.tokens}; "
        f"P2P ctas {a.ctas}; -> {writer.path}")
    rows, main_v = [], ["p2p_ar", "p2p_fused", "p2p_fused_copy", "p2p_fused_simple"]
    for hidden in a.hidden:
        max_tokens = max(a.tokens + (a.sweep_tokens if hidden == a.hidden[0] else []))
        # Two-shot only: the one-shot path reduces every row from its one-shot area, which the stand-ins fill
        # with a pattern, not the case's partials (a --quick run at 64 rows read WRONG there).
        pc = P2PComm(world, hidden, max_tokens, oneshot_max_tokens=0, emulate=emu, **common.p2p_options(a))
        sizes = sorted(set(a.tokens) | (set(a.sweep_tokens) if hidden == a.hidden[0] else set()))
        for n in sizes:
            case = Case(world, n, hidden, tp=emu.tp, me=emu.rank, pc=pc)
            todo = variants(world, None, pc, case, a.ctas, main_v) if n in a.tokens else []
            if hidden == a.hidden[0] and n in a.sweep_tokens:
                todo += [v for c in a.sweep_ctas if not (c == a.ctas and n in a.tokens)
                         for v in variants(world, None, pc, case, c, ["p2p_fused", "p2p_ar"])]
            rows += measure_all(world, a, todo, case, None, pc, writer, tp=emu.tp)
            del case
            cp.get_default_memory_pool().free_all_blocks()
        pc.close()
    say(f"wrote {len(rows)} rows to {writer.path}")
    return 0 if all(r["correct"] for r in rows) else 1


def print_tables(rows, a):
    print("\n== main table: time_us (algbw GB/s); p2p ctas =", a.ctas)
    names = ["nccl_ar", "nccl_ar_norm", "nccl_rs_norm_ag", "p2p_ar", "p2p_fused", "p2p_fused_copy", "p2p_fused_simple",
             "p2p_fused_2shot"]
    print(f"{'H':>5} {'tokens':>6} " + " ".join(f"{k:>20}" for k in names) + f" {'fused/nccl_ar':>13}")
    key = {(r["hidden"], r["tokens"], r["kernel"]): r for r in rows if not r["sweep"]}
    for h in a.hidden:
        for n in a.tokens:
            cells = []
            for k in names:
                r = key.get((h, n, k))
                cells.append(f"{r['time_us']:9.1f} ({r['algbw_gbps']:5.0f}){'' if r['correct'] else '!'}" if r else " " * 20)
            f, b = key.get((h, n, "p2p_fused")), key.get((h, n, "nccl_ar"))
            ratio = f"{f['time_us'] / b['time_us']:13.2f}" if f and b else ""
            print(f"{h:5d} {n:6d} " + " ".join(f"{c:>20}" for c in cells) + " " + ratio)
    print("\n== CTA sweep (hidden %d): time_us (algbw GB/s)" % a.hidden[0])
    sweep = [r for r in rows if r["hidden"] == a.hidden[0] and r["tokens"] in a.sweep_tokens and r["transport"] == "p2p"]
    for k in ("p2p_fused", "p2p_ar", "p2p_fused_2shot"):
        for n in a.sweep_tokens:
            rs = sorted((r for r in sweep if r["kernel"] == k and r["tokens"] == n), key=lambda r: r["ctas"])
            if not rs:
                continue
            best = max(r["algbw_gbps"] for r in rs)
            knee = next((r["ctas"] for r in rs if r["algbw_gbps"] >= 0.9 * best), None)
            print(f"{k:16s} n={n:6d} " + " ".join(f"{r['ctas']}:{r['time_us']:.1f}({r['algbw_gbps']:.0f})" for r in rs)
                  + f"  90%-of-best at ctas={knee}")


if __name__ == "__main__":
    dist.shutdown(main() or 0)  # not sys.exit: teardown with graphs holding NCCL kernels can hang (tw.dist)
