"""What the latency job (experiments/latency.py) puts out besides its rows: the printed table, the
EMULATED rank's PROJECTED columns, and the optional per-op trace of one eager pass (--trace).
"""
from __future__ import annotations

from experiments import common, emulated
from tw.measure import trace
from tw.model import config


def emulated_columns(rows, emu, cfg, results_dir) -> None:
    """projected_nccl_ms (NOT measured: nocomm + 2 x layers all-reduces from a named table) and what
    follows from it, per row of an emulated run."""
    from tw.comm import emulation
    table = emulation.allreduce_table(emu.tp, results_dir)
    bound = {r["tokens"]: r["median_ms"] for r in rows if r["strategy"] == "nocomm"}
    for r in rows:
        proj = emulation.projected_nccl(bound.get(r["tokens"]), r["tokens"], cfg.hidden, cfg.num_layers, table)
        r.update(proj)
        p = proj["projected_nccl_ms"]
        r["projected_speedup_vs_nccl"] = p / r["median_ms"] if p else None
        r["projected_comm_paid"] = (common.comm_paid(r["median_ms"], p, bound.get(r["tokens"]))
                                    if r["strategy"] != "nocomm" else None)


def write_trace(args, world, cfg, strategy, tokens, forward, stream):
    """One eager forward pass under the tracer; rank 0 writes every rank's spans."""
    from pathlib import Path

    from tw.measure import results
    tracer = trace.Tracer(world.is_gpu, world.rank)
    with trace.tracing(tracer, stream):
        forward()
    rows = world.comm.gather(tracer.rows(), root=0)
    if world.rank == 0:
        stem = str(Path(args.trace) / f"trace-{cfg.name}-tp{world.tp_size}-{strategy}-{tokens}")
        meta = results.metadata(world, model=cfg.name, layers=cfg.num_layers, strategy=strategy, tokens=tokens)
        trace.write([r for per_rank in rows for r in per_rank], stem, meta)


def print_table(world, rows, cfg, args):
    depth = " (full depth)" if cfg.num_layers == config.PRESETS[cfg.name].num_layers else ""
    batch = ("one prompt per batch" if args.seq_len == "all" else f"prefill sequences of {args.seq_len} tokens")
    launch = (", CUDA graphs" if args.graph else ", eager") if world.is_gpu else ""
    tp = f"one rank of TP={emulated.emulation(args).tp} (emulated)" if emulated.emulation(args) else f"TP={world.tp_size}"
    world.print0(f"\n{cfg.name}, {cfg.num_layers} layers{depth}, {tp}, {batch}, {world.device}"
                 f"{launch}; median of {args.repeats} x "
                 f"{args.iters} passes, slowest rank" + ("" if world.is_gpu else " (CPU: timings mean nothing)")
                 + (" (TW_SHARE_GPU=1: ranks share one GPU, timings mean nothing)" if world.shared_gpu else ""))
    emu = emulated.emulation(args)
    if emu is not None:
        world.print0(emu.banner + f" (rank {emu.rank}); proj_* columns are PROJECTED, not measured: nocomm + "
                     f"2 x layers all-reduces from {rows[0].get('projected_nccl_source') if rows else '-'}")
    width = max([12] + [len(r["strategy"]) for r in rows])
    vs, paid_name, sp_key, paid_key = (("proj_vs_nccl", "proj_paid", "projected_speedup_vs_nccl", "projected_comm_paid")
                                       if emu else ("vs_nccl", "paid", "speedup_vs_nccl", "comm_paid"))
    head = (f"{'layers':>6} {'tokens':>7} {'strategy':<{width}} {'ms':>9} {'vs_nocomm':>9} {vs:>12} {paid_name:>9} "
            f"{'rel_err':>9} {'check':>6} {'split_at':>8}")
    if world.is_gpu:
        head += f" {'gemm_tflops':>11}"
    world.print0(head)
    for r in rows:
        sp = f"{r[sp_key]:.3f}x" if r.get(sp_key) else "-"
        err = f"{r['rel_err']:.2e}" if "rel_err" in r else "-"
        ok = ("ok" if r["correct"] else "FAIL") if "correct" in r else "-"
        split = str(r["split_at"]) if r["split_at"] is not None else "-"
        # CPU timings mean nothing: a share of them would only mislead (-694% was seen).
        paid = f"{100 * r[paid_key]:.0f}%" if r.get(paid_key) is not None and world.is_gpu else "-"
        vn = f"{r['vs_nocomm']:.3f}" if r.get("vs_nocomm") and world.is_gpu else "-"
        line = (f"{cfg.num_layers:>6} {r['tokens']:>7} {r['strategy']:<{width}} {r['median_ms']:>9.3f} {vn:>9} "
                f"{sp:>12} {paid:>9} {err:>9} {ok:>6} {split:>8}")
        if world.is_gpu:
            line += f" {r['gemm_tflops']:>11.0f}"
        world.print0(line)
    world.print0("columns: see python -m experiments.latency --help")
