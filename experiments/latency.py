"""The main job: end-to-end latency of a TP transformer forward pass, strategy by strategy.

    mpirun -n 2 python -m experiments.latency                      # llama3-70b, 4 layers, TP=2
    mpiexec -n 2 python -m experiments.latency --device cpu --check # no GPU: tiny model on NumPy + MPI

For every token count and strategy it builds the batch (prefill sequences of --seq-len tokens), runs
the forward once, optionally checks it against the float64 reference (tw/reference.py), then times
--iters forward passes (CUDA events, median and min/max, slowest rank), replaying one CUDA graph per
token count and strategy when --graph is on. Strategies are timed round-robin, --repeats rounds.
Rows go to a JSON-lines file with the run's metadata.

Columns: median_ms (one forward pass of --layers layers; min_ms, max_ms too), per_layer_ms,
speedup_vs_nccl (nccl median / this median), rel_err (||out - ref|| / ||ref||, with --check), correct
(rel_err <= the dtype's tolerance), split_at (tokenweave: first token of half B) and split_source
(tuned / tuned-unsplit / wave / naive, see --split), ctas_attn / ctas_mlp (tokenweave's CTA budgets), gemm_tflops (layer 0's
four GEMMs alone at this token count: the compute ceiling the strategies share).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from tw import batch as batching
from tw import bench, config, dist, graph, reference, results, schedules, trace
from tw import split as splitting
from tw.layers import layer_gemms
from tw.model import Model

CPU_MODELS = ("tiny", "tiny-qwen", "tiny-tp8", "small")
BANNER = ("=" * 78 + "\n  NO GPU: running the CPU fallback (NumPy + MPI, float32, model {model}).\n"
          "  This checks correctness only; the timings below mean nothing for GPUs.\n" + "=" * 78)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="mpirun -n <TP> python -m experiments.latency",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help=f"model preset: {sorted(config.PRESETS)} (default: llama3-70b on GPU, tiny on CPU)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default: all ranks of the node)")
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="batch sizes in tokens to sweep (default: 1024 4096 16384 on GPU, 64 200 on CPU)")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers to run (default: 4 on GPU, the preset's count on CPU)")
    p.add_argument("--strategies", nargs="+", default=["nccl", "nocomm", "fused", "tokenweave"],
                   help=f"strategies to compare, from {schedules.STRATEGIES} (finegrained2/4/8: k chunks); "
                        "nccl is the baseline (default: nccl nocomm fused tokenweave)")
    p.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                   help="auto: GPU if one is usable, else the CPU fallback")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per prefill sequence in a batch")
    p.add_argument("--prefix", type=int, default=0, help="tokens of each sequence already in the KV cache")
    p.add_argument("--decode", type=int, default=0,
                   help="of each batch's tokens, this many are decode tokens (one per sequence, each with "
                        "--decode-context tokens cached): a mixed chunked-prefill + decode batch")
    p.add_argument("--decode-context", type=int, default=1024, help="cached tokens of each decode sequence")
    p.add_argument("--iters", type=int, default=20, help="timed forward passes per point")
    p.add_argument("--warmup", type=int, default=5, help="untimed forward passes before timing")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds over all strategies, each timing --iters passes of every strategy in turn; "
                        "the median is over all rounds' passes")
    p.add_argument("--graph", action=argparse.BooleanOptionalAction, default=True,
                   help="replay a CUDA graph of the whole forward (GPU only; --no-graph launches eagerly)")
    p.add_argument("--graph-priority", action=argparse.BooleanOptionalAction, default=True,
                   help="instantiate graphs so each kernel keeps its stream's priority (tokenweave's comm stream "
                        "is high priority); --no-graph-priority replays every kernel at one priority, as a "
                        "plain cudaGraphInstantiate does (tw/graph.py)")
    p.add_argument("--check", action="store_true",
                   help="compare every strategy's output with the float64 reference (nocomm is skipped)")
    p.add_argument("--transport", choices=("p2p", "nccl"), default="p2p",
                   help="what fused and tokenweave communicate with: p2p (the fused kernel over CUDA IPC) or "
                        "nccl (reduce-scatter + norm + all-gather)")
    p.add_argument("--ctas", type=int, default=None,
                   help="CTAs of the fused P2P kernel. fused: default every SM (nothing to overlap). "
                        "tokenweave: CTAs of the comm that overlaps attention; default experiments/tuned/ "
                        "if it has this token count, else the kernel's default (8)")
    p.add_argument("--ctas-mlp", type=int, default=None,
                   help="tokenweave: CTAs for the comm that overlaps the MLP (default: --ctas)")
    p.add_argument("--split", choices=("tuned", "wave", "naive"), default="tuned",
                   help="tokenweave split point: tuned = the best point of experiments/tune.py's end-to-end "
                        "search when experiments/tuned/ has this token count, else wave; wave = the wave-aware "
                        "rule (from a measured GEMM profile); naive = half the tokens. Rows record split_source. "
                        "Where tune.py found splitting slower than the unsplit fused kernel, tuned runs unsplit")
    p.add_argument("--min-split-tokens", type=int, default=1024,
                   help="tokenweave does not split smaller batches (runs fused alone)")
    p.add_argument("--shard-as-tp", type=int, default=None,
                   help="hold weight shards sized as at this TP degree (e.g. 8) while communicating over the "
                        "real TP group: the paper's TP=8 compute/comm ratio on 2 GPUs. The output is not the "
                        "model's, so --check compares every strategy with nccl instead of the reference")
    p.add_argument("--trace", default=None, metavar="DIR",
                   help="after timing each point, trace one extra eager forward pass (per-op CUDA events on "
                        "every rank) into DIR/trace-*.json (Perfetto) and .csv; timed numbers are unaffected")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and token ids")
    p.add_argument("--out", default=None, help="result file (JSON lines; default experiments/results/latency-...)")
    return p.parse_args(argv)


def resolve(args, world):
    """Fill device-dependent defaults; switch to the CPU model with a banner when there is no GPU."""
    if world.is_gpu:
        args.model = args.model or "llama3-70b"
        args.tokens = args.tokens or [1024, 4096, 16384]
        args.layers = args.layers or 4
    else:
        if args.model not in (None, *CPU_MODELS):
            if args.device == "cpu":
                raise SystemExit(f"--model {args.model} is too large for the CPU path; use one of {CPU_MODELS}")
            world.print0(f"(no GPU: --model {args.model} replaced by tiny)")
            args.model = None
        args.model = args.model or "tiny"
        args.tokens = args.tokens or [64, 200]
        args.graph = False
        args.repeats = 1
        world.print0(BANNER.format(model=args.model))
    bad = [t for t in args.tokens if t < world.tp_size]
    if bad:
        raise SystemExit(f"--tokens {bad}: every batch needs at least as many tokens as TP ranks ({world.tp_size})")
    unknown = [s for s in args.strategies if s not in schedules.STRATEGIES
               and not (s.startswith("finegrained") and s[len("finegrained"):].isdigit())]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; choose from {schedules.STRATEGIES}")
    if args.decode and any(t <= args.decode for t in args.tokens):
        raise SystemExit(f"--decode {args.decode} must be smaller than every --tokens value {args.tokens}")
    if args.seq_len < 1 or args.prefix < 0 or args.iters < 1 or args.warmup < 0 or args.repeats < 1:
        raise SystemExit("--seq-len, --iters and --repeats must be >= 1, --prefix and --warmup >= 0")
    return config.get(args.model, args.layers)


def gemm_tflops(model, num_tokens, stream, iters):
    """TFLOP/s and ms of layer 0's four GEMMs alone at this token count (GPU); the slowest rank's."""
    gemms, flops = layer_gemms(model, num_tokens, stream)
    t = bench.summarize(bench.time_gpu(gemms, iters, 3, stream), model.world.comm)
    return flops / (t["median_ms"] * 1e-3) / 1e12, t["median_ms"]


def main(argv=None):
    args = parse_args(argv)
    world = dist.init(args.tp, args.device)
    cfg = resolve(args, world)
    stream = world.new_stream()
    max_tokens = max(args.tokens)
    capacity = max(make_batch(args, t).kv_capacity for t in args.tokens)
    world.print0(f"building {cfg.name}: {cfg.num_layers} layers, TP={world.tp_size}, DP={world.dp_size}, "
                 f"up to {max_tokens} tokens, device={world.device}")
    t0 = time.perf_counter()
    model = Model(cfg, world, max_tokens, capacity, seed=args.seed, shard_as_tp=args.shard_as_tp)
    if model.emulated:
        world.print0(f"EMULATED: weight shards sized as at TP={args.shard_as_tp}, communication over "
                     f"TP={world.tp_size}; outputs are not the model's (checked against nccl)")
    world.print0(f"built in {time.perf_counter() - t0:.1f} s")
    rule = "wave" if args.split == "tuned" else args.split  # the rule where nothing is tuned
    strategies = [schedules.make(s, model, world, args.transport, args.ctas, split=rule,
                                 ctas_mlp=args.ctas_mlp, min_split_tokens=args.min_split_tokens)
                  for s in args.strategies]
    tag = f"{cfg.name}-tp{world.tp_size}-{results.gpu_info()['gpu'].replace(' ', '_') if world.is_gpu else 'cpu'}"
    writer = results.Writer(args.out or results.default_path("latency", tag),
                            results.metadata(world, model=cfg.name, layers=cfg.num_layers, dtype=str(model.dtype),
                                             shard_as_tp=args.shard_as_tp,
                                             check_against="nccl" if model.emulated else "float64 reference",
                                             split=args.split, min_split_tokens=args.min_split_tokens,
                                             seq_len=args.seq_len, prefix=args.prefix, decode=args.decode,
                                             decode_context=args.decode_context, graph=args.graph,
                                             graph_priority=args.graph_priority,
                                             transport=args.transport, iters=args.iters, warmup=args.warmup),
                            world.rank)
    tuned = (splitting.load_tuned(cfg.name, world.tp_size, results.gpu_info()["gpu"], args.shard_as_tp)
             if world.is_gpu else {})
    if tuned:
        world.print0(f"tokenweave CTA budgets{' and split points' if args.split == 'tuned' else ''} from "
                     f"experiments/tuned/ for tokens {sorted(tuned)}")
    rows, step, total = [], 0, len(args.tokens) * len(strategies)
    for tokens in args.tokens:
        batch = make_batch(args, tokens)
        ids = batching.token_ids(tokens, cfg.vocab, args.seed)
        ref = None
        if args.check and not model.emulated:
            xp = model.xp
            t0 = time.perf_counter()
            ref = reference.forward(cfg, batch, ids, args.seed, xp, model.dtype)
            world.print0(f"float64 reference for {tokens} tokens in {time.perf_counter() - t0:.1f} s")
        # Setup and check every strategy first, then time them round-robin (--repeats rounds), so slow
        # drifts of the machine hit every strategy alike instead of favouring the one measured first.
        runs, point_rows = [], []
        for strat in strategies:
            step += 1
            split_source = None
            if strat.name == "tokenweave":  # tuned budgets and split for this token count, else the flags
                use_tuned = args.ctas is None and tokens in tuned
                strat.ctas_attn = tuned[tokens]["ctas_attn"] if use_tuned else args.ctas
                strat.ctas_mlp = tuned[tokens]["ctas_mlp"] if use_tuned else (args.ctas_mlp or args.ctas)
                choice = tuned.get(tokens, {}) if args.split == "tuned" else {}
                best = choice.get("best_split")
                unsplit = not choice.get("split", True)
                split_source = "tuned-unsplit" if unsplit else "tuned" if best is not None else rule
                plan = strat.prepare(batch, ids, best, unsplit=unsplit)
            else:
                plan = strat.prepare(batch, ids)

            def forward(strat=strat, plan=plan):
                return strat.forward(plan, stream)

            out = forward()
            run = graph.Graph(forward, stream, args.graph_priority) if args.graph and world.is_gpu else forward
            if world.is_gpu:
                run()
                stream.synchronize()
            strat.comm.check()  # a P2P kernel that gave up waiting for a peer raises here
            row = {"tokens": tokens, "strategy": strat.name, "seqs": len(batch.seqs),
                   "split_at": plan.parts[1].offset if len(plan.parts) == 2 else None,
                   "split_source": split_source if len(plan.parts) == 2 or split_source == "tuned-unsplit" else None,
                   "transport": getattr(strat.comm, "name", type(strat.comm).__name__),
                   "ctas": getattr(strat, "ctas", None), "ctas_attn": getattr(strat, "ctas_attn", None),
                   "ctas_mlp": getattr(strat, "ctas_mlp", None)}
            if args.check and model.emulated and strat.name == "nccl":
                ref = out.astype(model.xp.float64)  # the baseline's output is the reference here
            elif ref is not None and strat.name != "nocomm":
                err = reference.rel_err(out, ref)
                err = {k: world.comm.allreduce(v, op=max_op()) for k, v in err.items()}
                row.update(err, correct=bool(err["rel_err"] <= reference.tolerance(model.dtype)))
            world.print0(f"[{step}/{total}] tokens={tokens:>6} {strat.name:<12} ready"
                         + (f"  rel_err={row['rel_err']:.2e} {'ok' if row['correct'] else 'FAIL'}"
                            if "rel_err" in row else ""))
            runs.append((run, forward))
            point_rows.append(row)
        times = [[] for _ in runs]
        for _ in range(args.repeats):
            for i, (run, _) in enumerate(runs):
                times[i].append(bench.time_gpu(run, args.iters, args.warmup, stream) if world.is_gpu
                                else bench.time_cpu(run, min(args.iters, 3), min(args.warmup, 1)))
        for strat, (run, _), row in zip(strategies, runs, point_rows):
            # After timing: no transport gave up, and every strategy still computes the same output
            # (a failed P2P call would otherwise only show as implausibly fast timings).
            run()
            if world.is_gpu:
                stream.synchronize()
            strat.comm.check()
            if "rel_err" in row:
                after = world.comm.allreduce(reference.rel_err(model.ws.x[:tokens], ref)["rel_err"], op=max_op())
                row["rel_err_after_timing"] = after
                row["correct"] = row["correct"] and bool(after <= reference.tolerance(model.dtype))
        gemm = gemm_tflops(model, tokens, stream, args.iters) if world.is_gpu else None
        for row, t, (_, forward) in zip(point_rows, times, runs):
            row.update(bench.summarize(np.concatenate(t), world.comm), repeats=args.repeats)
            row["per_layer_ms"] = row["median_ms"] / cfg.num_layers
            if gemm:
                row.update(gemm_tflops=gemm[0], gemm_layer_ms=gemm[1])
            if args.trace:
                write_trace(args, world, cfg, row["strategy"], tokens, forward, stream)
            world.print0(f"        tokens={tokens:>6} {row['strategy']:<12} {row['median_ms']:9.3f} ms")
        rows += point_rows
    base = {r["tokens"]: r["median_ms"] for r in rows if r["strategy"] == "nccl"}
    for r in rows:
        r["speedup_vs_nccl"] = base[r["tokens"]] / r["median_ms"] if r["tokens"] in base else None
        writer.write(r)
    print_table(world, rows, cfg, args)
    world.print0(f"wrote {writer.path}")
    failed = [r for r in rows if r.get("correct") is False]
    if failed:
        world.print0(f"CHECK FAILED for {[(r['tokens'], r['strategy']) for r in failed]}")
        return 1
    return 0


def make_batch(args, tokens):
    return batching.workload(tokens, args.seq_len, args.prefix, args.decode, args.decode_context)


def write_trace(args, world, cfg, strategy, tokens, forward, stream):
    """One eager forward pass under the tracer; rank 0 writes every rank's spans."""
    from pathlib import Path
    tracer = trace.Tracer(world.is_gpu, world.rank)
    with trace.tracing(tracer, stream):
        forward()
    rows = world.comm.gather(tracer.rows(), root=0)
    if world.rank == 0:
        Path(args.trace).mkdir(parents=True, exist_ok=True)
        stem = str(Path(args.trace) / f"trace-{cfg.name}-tp{world.tp_size}-{strategy}-{tokens}")
        meta = results.metadata(world, model=cfg.name, layers=cfg.num_layers, strategy=strategy, tokens=tokens)
        trace.write([r for per_rank in rows for r in per_rank], stem, meta)


def max_op():
    from mpi4py import MPI
    return MPI.MAX


def print_table(world, rows, cfg, args):
    world.print0(f"\n{cfg.name}, {cfg.num_layers} layers, TP={world.tp_size}, {world.device}"
                 f"{', CUDA graphs' if args.graph else ''}; median of {args.repeats} x "
                 f"{args.iters if world.is_gpu else min(args.iters, 3)} passes, slowest rank")
    head = f"{'tokens':>7} {'strategy':<12} {'ms':>9} {'vs nccl':>8} {'rel_err':>9} {'check':>6}"
    if world.is_gpu:
        head += f" {'GEMM TFLOP/s':>13}"
    world.print0(head)
    for r in rows:
        sp = f"{r['speedup_vs_nccl']:.3f}x" if r.get("speedup_vs_nccl") else "-"
        err = f"{r['rel_err']:.2e}" if "rel_err" in r else "-"
        ok = ("ok" if r["correct"] else "FAIL") if "correct" in r else "-"
        line = f"{r['tokens']:>7} {r['strategy']:<12} {r['median_ms']:>9.3f} {sp:>8} {err:>9} {ok:>6}"
        if world.is_gpu:
            line += f" {r['gemm_tflops']:>13.0f}"
        world.print0(line)


if __name__ == "__main__":
    dist.shutdown(main())
