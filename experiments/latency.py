"""The main job: end-to-end latency of a TP transformer forward pass, strategy by strategy.

    mpirun -n 2 python -m experiments.latency             # llama3-70b, 4 layers, TP=2
    mpiexec -n 2 python -m experiments.latency --check     # no GPU: the tiny model, NumPy + MPI
    mpirun -n 2 python -m experiments.latency --paper     # the paper's Fig. 2/11 setting

Per token count each strategy passes once (--check: against the float64 reference), then all are timed
round-robin: --repeats rounds of --iters passes (CUDA events, slowest rank, CUDA graphs).
Strategies: nccl (baseline: GEMM -> NCCL all-reduce -> add + RMSNorm); nocomm (all-reduce removed: the
bound, output not the model's); fused (one fused AR + add + RMSNorm kernel, every SM); finegrained<k>
(GEMMs in k token chunks overlapping their all-reduces); tokenweave (two halves, one half's fused comm
overlapping the other half's compute).

Columns: ms = median_ms, one pass of `layers` layers; vs_nocomm = ms / nocomm's (below 1: faster than
removing the comm); vs_nccl = speedup_vs_nccl, nccl's ms / ms; paid = comm_paid, the share of nccl's
comm cost still paid, (ms - nocomm's) / (nccl's - nocomm's) (0%: all hidden; 100%: as much as nccl;
needs nccl slower than nocomm); rel_err = ||out - ref|| / ||ref|| (--check); check = correct, rel_err <=
the dtype's tolerance; split_at = tokenweave's first token of half B (`-`: unsplit); gemm_tflops = layer
0's four GEMMs alone, the ceiling all strategies share. vs_nocomm, paid, gemm_tflops: GPU only (CPU
timings mean nothing). Rows add min_ms, max_ms, per_layer_ms, split_source (tuned, tuned-unsplit, wave,
naive, below-threshold), the CTA budgets that ran (ctas, ctas_attn, ctas_mlp) and sm_target_attn /
sm_target_mlp. --emulate-tp: nccl is PROJECTED, nocomm + 2 x layers all-reduces from a named table:
proj_vs_nccl, proj_paid (rows: projected_nccl_ms, projected_speedup_vs_nccl, projected_comm_paid,
projected_nccl_source).
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

from experiments import common, emulated, tuned_choices
from experiments.latency_report import emulated_columns, print_table, write_trace
from tw.model import reference
from tw.model import batch as batching
from tw.measure import bench
from tw.runtime import dist, graph
from tw.schedule import strategies as schedules
from tw.schedule import split as splitting
from tw.model.layers import layer_gemms

DEFAULT_STRATEGIES = ["nccl", "nocomm", "fused", "tokenweave"]
DEFAULT_SEQ_LEN = 1024
# The paper's latency runs (arXiv 2505.11329 Fig. 2 and 11): one prompt of N tokens, full depth, eager.
PAPER = {"seq_len": "all", "layers": "all", "graph": False, "strategies": ["nccl", "nocomm", "fused", "tokenweave"],
         "tokens": [1024, 2048, 4096, 8192, 16384, 32768, 65536]}


def parse_args(argv=None):
    p = common.parser("latency", __doc__)
    common.add_model_flags(p)
    common.add_tokens_flag(p, gpu=[1024, 4096, 16384], cpu=[64, 200, 1500])
    p.add_argument("--paper", action="store_true",
                   help="the paper's setting (Fig. 2/11) for each flag not given: --seq-len all --layers all "
                        f"--no-graph --tokens {PAPER['tokens'][0]} ... {PAPER['tokens'][-1]} (CPU: its usual)"
                        + ("" if PAPER["strategies"] == DEFAULT_STRATEGIES else
                           f" --strategies {' '.join(PAPER['strategies'])}"))
    p.add_argument("--strategies", nargs="+", default=None, metavar="S",
                   help=f"{', '.join(schedules.STRATEGIES)} (finegrained = finegrained4), finegrained<k> (default: "
                        f"{' '.join(DEFAULT_STRATEGIES)})")
    # A string, checked in validate(): a bad value is then one `error:` line, as every user error is.
    p.add_argument("--seq-len", default=None, metavar="N|all",
                   help="new tokens per prefill sequence, or all: each batch is one prompt (default: "
                        f"{DEFAULT_SEQ_LEN}; all with --paper)")
    p.add_argument("--prefix", type=int, default=0, metavar="N",
                   help="cached tokens of each prefill sequence")
    p.add_argument("--decode", type=int, default=0, metavar="N",
                   help="decode tokens per batch, one per sequence")
    p.add_argument("--decode-context", type=int, default=1024, metavar="N",
                   help="cached tokens of each decode sequence")
    p.add_argument("--check", action="store_true",
                   help="compare outputs (but nocomm's) with the float64 reference (--shard-as-tp: with nccl's)")
    p.add_argument("--split", choices=("tuned", "wave", "naive"), default="tuned", metavar="RULE",
                   help="tokenweave's split: tuned = tune.py's for this setting (may be unsplit), else wave "
                        "= the wave-aware rule (CPU: naive); naive = T // 2")
    p.add_argument("--min-split-tokens", type=int, default=None, metavar="N",
                   help=f"smaller batches run unsplit (default: {splitting.MIN_SPLIT_TOKENS['dense']}; MoE "
                        f"{splitting.MIN_SPLIT_TOKENS['moe']})")
    p.add_argument("--trace", default=None, metavar="DIR",
                   help="trace one more eager pass per point into DIR/trace-*.json (Perfetto) and .csv")
    common.add_timing_flags(p)
    common.add_run_flags(p)
    gpu = common.gpu_group(p)
    gpu.add_argument("--graph", action=argparse.BooleanOptionalAction, default=None,
                     help="one CUDA graph per pass (default: on; off with --paper and for MoE: its row "
                          "counts go through the host)")
    gpu.add_argument("--graph-priority", action=argparse.BooleanOptionalAction, default=True,
                     help="graph kernels keep their stream's priority (tokenweave's comm: high); off: one "
                          "priority, as plain cudaGraphInstantiate (default: on)")
    common.add_transport_flag(gpu)
    common.add_ctas_flags(gpu)
    gpu.add_argument("--sm-target", choices=("tuned", "left", "off"), default="tuned", metavar="T",
                     help="cuBLAS SMs beside tokenweave's comm: tuned (else none), left (what it leaves), off")
    gpu.add_argument("--tuned-file", default=None, metavar="JSON",
                     help="tokenweave's split and CTAs from this tuned file (default: this setting's, see "
                          "--split)")
    return paper_defaults(p.parse_args(argv))


def paper_defaults(args):
    """Fill the flags left out: --paper's values where it is given, else the usual defaults. The token
    counts are left to common.init (it picks the GPU or the CPU list once the device is known)."""
    paper = PAPER if args.paper else {}
    if args.seq_len is None:
        args.seq_len = paper.get("seq_len", DEFAULT_SEQ_LEN)
    if args.layers is None and paper:
        args.layers = paper["layers"]
    args._graph_given = args.graph is not None
    args._strategies_given = args.strategies is not None
    if args.graph is None:
        args.graph = paper.get("graph", True)
    if args.strategies is None:
        args.strategies = list(paper.get("strategies", DEFAULT_STRATEGIES))
    if paper:
        args._tokens_defaults = (list(PAPER["tokens"]), args._tokens_defaults[1])
    return args


def validate(args, world, cfg):
    """User errors, before anything is built (each names its flag)."""
    common.validate_strategies(args.strategies)
    args.seq_len = common.seq_len_value(args.seq_len)
    if args.prefix < 0:
        raise dist.UsageError(f"--prefix must be >= 0, got {args.prefix}")
    if args.decode < 0:
        raise dist.UsageError(f"--decode must be >= 0, got {args.decode}")
    if args.decode and any(t <= args.decode for t in args.tokens):
        raise dist.UsageError(f"--decode {args.decode} must be smaller than every --tokens value {args.tokens}")
    if args.decode and args.decode_context < 1:
        raise dist.UsageError(f"--decode-context must be >= 1, got {args.decode_context}")
    new = max(min(common.seq_len_of(args, t), t) for t in args.tokens)  # the longest prefill sequence's new tokens
    if args.prefix + new > cfg.max_context:
        raise dist.UsageError(f"a sequence of {args.prefix + new} tokens ({args.prefix} cached by --prefix + {new} new) "
                              f"is more than {cfg.name}'s context of {cfg.max_context}; use a shorter --prefix or "
                              "--seq-len, or fewer --tokens")
    if args.decode and args.decode_context + 1 > cfg.max_context:
        raise dist.UsageError(f"--decode-context {args.decode_context} + 1 new token is more than {cfg.name}'s context "
                              f"of {cfg.max_context} tokens")
    common.check_ctas(args, world)
    if args.min_split_tokens is not None and args.min_split_tokens < 2:
        raise dist.UsageError(f"--min-split-tokens must be >= 2 (two halves), got {args.min_split_tokens}")
    emulated.emulation_strategies(args)
    if args.trace:
        from pathlib import Path
        try:
            Path(args.trace).mkdir(parents=True, exist_ok=True)
            probe = Path(args.trace) / f".tw-write-test-{os.getpid()}"  # one per rank: ranks check at once
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise dist.UsageError(f"--trace {args.trace}: cannot write there ({e.strerror})") from None


def gemm_tflops(model, num_tokens, stream, iters):
    """TFLOP/s and ms of layer 0's four GEMMs alone at this token count (GPU); the slowest rank's."""
    gemms, flops = layer_gemms(model, num_tokens, stream)
    ms = bench.slowest_median(bench.time_gpu(gemms, iters, 3, stream), model.world.comm)
    return flops / (ms * 1e-3) / 1e12, ms


@dataclass
class Run:
    """A latency run as `build` sets it up; every later step reads it."""
    args: argparse.Namespace
    world: object
    cfg: object
    model: object
    strategies: list
    batches: dict        # {tokens: Batch}
    stream: object
    writer: object

    @property
    def routed_refs(self) -> bool:
        """MoE --check: rounding can flip near-tie routings, so each strategy gets a reference that follows
        its own routing at near-ties (tw/model/reference.forward's `routing`), computed after its pass."""
        return bool(self.args.check and self.cfg.num_experts and not self.model.emulated)


@dataclass
class Captured:
    """One strategy at one token count: passed once, checked, ready to time."""
    strat: object
    run: object          # what is timed: the CUDA graph's replay, or the eager pass
    forward: object      # the eager pass (--trace)
    out: object          # where its passes (and replays) write
    row: dict
    ref: object = None   # what `out` was checked against (None: not checked)


def main(argv=None):
    args = parse_args(argv)
    world, cfg = configure(args)
    run = build(args, world, cfg)
    rows, step, total = [], 0, len(args.tokens) * len(run.strategies)
    for tokens in args.tokens:
        batch, ids = run.batches[tokens], batching.token_ids(tokens, cfg.vocab, args.seed)
        ref = reference_of(run, tokens, batch, ids)
        # Set up and check every strategy first, then time them round-robin, so slow drifts of the
        # machine hit every strategy alike instead of favouring the one measured first.
        point = []
        for strat in run.strategies:
            step += 1
            c, routing = capture(run, strat, tokens, batch, ids)
            ref = check(run, c, ref, routing, batch, ids)
            world.print0(f"[{step}/{total}] tokens={tokens:>6} {strat.name:<12} ready"
                         + (f"  rel_err={c.row['rel_err']:.2e} {'ok' if c.row['correct'] else 'FAIL'}"
                            if "rel_err" in c.row else ""))
            point.append(c)
        time_point(run, tokens, point)
        rows += [c.row for c in point]
    return report(run, rows)


def configure(args):
    """(world, cfg): the device and the model preset, the flags checked and their defaults filled in."""
    tokens_given = args.tokens is not None
    world = common.init(args)
    cfg = common.model_config(args, world)
    validate(args, world, cfg)
    if args.min_split_tokens is None:
        args.min_split_tokens = splitting.min_split_tokens(cfg)
    if cfg.num_experts and world.is_gpu and args.graph:
        if args._graph_given:
            raise dist.UsageError(f"--graph with {cfg.name}: an MoE block reads its per-expert row counts back to "
                                  "the host (cuBLAS takes GEMM sizes from there), which a CUDA graph cannot hold; "
                                  "use --no-graph")
        args.graph = False
        world.print0(f"{cfg.name} is an MoE model: launched eagerly (its blocks wait for their routed row counts "
                     "on the host, which a CUDA graph cannot hold)")
    if args.paper and not world.is_gpu and not tokens_given:
        world.print0(f"--paper on the CPU: tokens {' '.join(map(str, args.tokens))}, not the paper's "
                     f"{PAPER['tokens'][0]}-{PAPER['tokens'][-1]} (one prompt of 64K tokens takes minutes here)")
    common.shared_gpu_strategies(args, world)
    common.note_tp1(world)
    return world, cfg


def build(args, world, cfg) -> Run:
    """The batches, the model, the strategies (tokenweave with its tuned choices) and the result writer.
    Everything is sized from the token counts (workspace, KV, transports); nothing else caps them."""
    stream = world.new_stream()
    tokens = max(args.tokens)  # an upper bound of the KV slots, before any batch is built
    longest = min(common.seq_len_of(args, tokens), tokens)  # the longest prefill sequence (the reference's scores)
    kv_bound = tokens + (tokens // longest + 1) * args.prefix + args.decode * args.decode_context
    common.check_memory(args, world, cfg, tokens, kv_bound, len(args.strategies), tokens if args.check else 0,
                        longest)
    batches = {t: batching.workload(t, common.seq_len_of(args, t), args.prefix, args.decode, args.decode_context)
               for t in args.tokens}
    if world.is_gpu:
        check_attention_grid(batches)
    capacity = max(b.kv_capacity for b in batches.values())
    model = common.build_model(args, world, cfg, max(args.tokens), capacity, transports=len(args.strategies),
                               reference_tokens=max(args.tokens) if args.check else 0, seq_len=longest)
    strategies = [schedules.make(s, model, world, args.transport, args.ctas, split=args.split, ctas_mlp=args.ctas_mlp,
                                 min_split_tokens=args.min_split_tokens, sm_target=args.sm_target,
                                 tuned_file=args.tuned_file, p2p=common.p2p_options(args)) for s in args.strategies]
    writer = common.writer(args, world, "latency", cfg, dtype=str(model.dtype),
                           check_against="nccl" if model.emulated else "float64 reference")
    tuned_choices.use(args, world, cfg, strategies, args.seq_len, args.tokens)
    return Run(args, world, cfg, model, strategies, batches, stream, writer)


def reference_of(run, tokens, batch, ids):
    """--check: the float64 reference of this batch, shared by every strategy (None without --check, for
    emulated shards, and for MoE models, whose references follow each strategy's routing: check)."""
    args, world, model = run.args, run.world, run.model
    if not args.check or model.emulated or run.routed_refs:
        return None
    world.print0(f"float64 reference for {tokens} tokens (rank 0, then broadcast) ...")
    t0 = time.perf_counter()
    with dist.step(f"float64 reference, {tokens} tokens"):
        ref = reference.forward_once(world, run.cfg, batch, ids, args.seed, model.xp, model.dtype)
    world.print0(f"  done in {time.perf_counter() - t0:.1f} s")
    return ref


def capture(run, strat, tokens, batch, ids):
    """(Captured, routing): strat's plan for the batch, one eager pass, and its CUDA graph (--graph, GPU)
    replayed once; routing: the MoE experts the pass chose (MoE --check), else None."""
    args, world, model, stream = run.args, run.world, run.model, run.stream
    plan = strat.prepare(batch, ids)

    def forward():
        return strat.forward(plan, stream)

    with dist.step(f"tokens={tokens} {strat.name}: first pass"):
        model.routing = {} if run.routed_refs else None
        out = forward()
        routing, model.routing = model.routing, None
        timed = graph.Graph(forward, stream, args.graph_priority) if args.graph and world.is_gpu else forward
        if world.is_gpu:
            if timed is not forward:  # one replay of the new graph (eager: the pass above was one)
                timed()
            stream.synchronize()
        strat.comm.check()  # a P2P kernel that gave up waiting for a peer raises here
    row = {"tokens": tokens, "strategy": strat.name, "seqs": len(batch.seqs), "split_at": plan.split_at,
           "split_source": plan.split_source, "transport": strat.comm.name,
           "p2p_pull": bool(getattr(strat.comm, "pull", False)), "ctas": plan.ctas,
           "ctas_attn": plan.ctas_attn, "ctas_mlp": plan.ctas_mlp, "sm_target_attn": plan.sm_target_attn,
           "sm_target_mlp": plan.sm_target_mlp}
    return Captured(strat, timed, forward, out, row), routing


def check(run, c, ref, routing, batch, ids):
    """--check: c's output against `ref` (MoE: against a reference of its own, following its routing at
    near-ties), into c.row's rel_err / correct. Returns the reference of the strategies after it: on
    emulated shards nccl's output is the reference of those that follow it."""
    args, world, model = run.args, run.world, run.model
    name = c.strat.name
    if run.routed_refs and name != "nocomm":
        with dist.step(f"float64 reference for {name}, {c.row['tokens']} tokens"):
            ref = reference.forward_once(world, run.cfg, batch, ids, args.seed, model.xp, model.dtype,
                                         routing if world.rank == 0 else None)
    if args.check and model.emulated and name == "nccl":
        return c.out.astype(model.xp.float64)  # the baseline's output is the reference here
    if ref is not None and name != "nocomm":
        err = {k: world.comm.allreduce(v, op=common._max()) for k, v in reference.rel_err(c.out, ref).items()}
        c.row.update(err, correct=bool(err["rel_err"] <= reference.tolerance(model.dtype)))
        c.ref = ref
    return ref


def time_point(run, tokens, point) -> None:
    """Time the captured strategies round-robin (--repeats rounds of --iters passes each), check them
    again, and complete their rows: times, layer 0's GEMM rate (GPU), and --trace's extra pass."""
    args, world, stream = run.args, run.world, run.stream

    def measure(i):
        # One step per strategy and round, not per token count: at full depth and 64K tokens one
        # pass takes seconds, and a step is bounded by TW_TIMEOUT_S (tw/runtime/watchdog.py).
        with dist.step(f"timing tokens={tokens} {point[i].strat.name}"):
            return bench.passes(point[i].run, world, stream, args.iters, args.warmup)

    samples = bench.round_robin(range(len(point)), measure, args.repeats)
    for c in point:
        check_after_timing(run, c)
    gemm = gemm_tflops(run.model, tokens, stream, args.iters) if world.is_gpu else None
    for i, c in enumerate(point):
        row = c.row
        row.update(bench.summarize(samples[i], world.comm), iters=args.iters, warmup=args.warmup,
                   repeats=args.repeats)
        row["per_layer_ms"] = row["median_ms"] / run.cfg.num_layers
        if gemm:
            row.update(gemm_tflops=gemm[0], gemm_layer_ms=gemm[1])
        if args.trace:
            write_trace(args, world, run.cfg, row["strategy"], tokens, c.forward, stream)
        world.print0(f"        tokens={tokens:>6} {row['strategy']:<12} {row['median_ms']:9.3f} ms")


def check_after_timing(run, c) -> None:
    """After timing: no transport gave up, and the strategy still computes the same output (a failed
    P2P call would otherwise only show as implausibly fast timings)."""
    c.run()
    if run.world.is_gpu:
        run.stream.synchronize()
    c.strat.comm.check()
    if "rel_err" in c.row:
        after = run.world.comm.allreduce(reference.rel_err(c.out, c.ref)["rel_err"], op=common._max())
        c.row["rel_err_after_timing"] = after
        c.row["correct"] = c.row["correct"] and bool(after <= reference.tolerance(run.model.dtype))


def report(run, rows) -> int:
    """The columns relative to nccl and nocomm (and the projected ones of an emulated rank), the rows
    written, the table printed; 1 when a check failed."""
    args, world, cfg = run.args, run.world, run.cfg
    base = {r["tokens"]: r["median_ms"] for r in rows if r["strategy"] == "nccl"}
    bound = {r["tokens"]: r["median_ms"] for r in rows if r["strategy"] == "nocomm"}
    emu = emulated.emulation(args)
    if emu is not None:
        from tw.measure.results import RESULTS_DIR
        emulated_columns(rows, emu, cfg, RESULTS_DIR)
    for r in rows:
        r["speedup_vs_nccl"] = base[r["tokens"]] / r["median_ms"] if r["tokens"] in base else None
        r["vs_nocomm"] = r["median_ms"] / bound[r["tokens"]] if r["tokens"] in bound else None
        if r["strategy"] not in ("nccl", "nocomm"):
            r["comm_paid"] = common.comm_paid(r["median_ms"], base.get(r["tokens"]), bound.get(r["tokens"]))
        run.writer.write(r)
    print_table(world, rows, cfg, args)
    world.print0(f"wrote {run.writer.path}")
    failed = [r for r in rows if r.get("correct") is False]
    if failed:
        world.print0(f"CHECK FAILED for {[(r['tokens'], r['strategy']) for r in failed]}")
        return 1
    return 0


def check_attention_grid(batches) -> None:
    """The attention kernel's one row limit: a batch's query blocks (one per 128 new tokens of each
    sequence) form the grid's y dimension, at most 65535 (tw/ops/attention.py). Said here, naming the flags,
    rather than from inside the first forward pass."""
    from tw.ops.attention import DEFAULT_BLOCK_M, MAX_WORK_ITEMS
    for t, b in batches.items():
        blocks = sum(-(-s.new // DEFAULT_BLOCK_M) for s in b.seqs)
        if blocks > MAX_WORK_ITEMS:
            raise dist.UsageError(f"--tokens {t}: the batch has {blocks} attention query blocks ({len(b.seqs)} "
                                  f"sequences, one block per {DEFAULT_BLOCK_M} new tokens of each) but the attention "
                                  f"kernel's grid holds {MAX_WORK_ITEMS}; use a longer --seq-len (or all), fewer "
                                  "--tokens or fewer --decode tokens")


if __name__ == "__main__":
    dist.shutdown(main())
