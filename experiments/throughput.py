"""Offline serving throughput: continuous batching with chunked prefill, strategy by strategy.

    mpirun -n 2 python -m experiments.throughput                 # llama3-70b, 4 layers, TP=2, 1000 requests
    mpiexec -n 2 python -m experiments.throughput --check        # no GPU: tiny model, NumPy + MPI

N requests are submitted at t = 0 (--workload random: --input-len prompt tokens each, exactly
--output-len generated tokens, ignore_eos; sharegpt-like: the synthetic long-tailed table of
experiments/workloads/). tw/serve/engine.py schedules each step: a budget of --chunk tokens, running decodes
first (one token each), then prefill chunks in arrival order (a long prompt continues over several
steps); each request reserves prompt + output KV slots at admission (--kv-tokens slots in all, at most
--max-seqs requests running) and waits when they are not free. Each step's batch runs through the
strategy eagerly (shapes change every step: no CUDA graphs), then a vocab-parallel LM head picks the
next tokens greedily (tw/serve/lm_head.py). tokenweave splits a step's batch only from --min-split-tokens
tokens (below, it runs as fused); its split is the tuned choice for exactly this setting with seq_len =
the chunk size, else the wave rule.

Columns (table and rows, one row per chunk, workload and strategy): tok/s = total_tokens_per_s (prompt
+ output tokens / makespan); out_tok/s = output_tokens_per_s; requests_per_s; vs_nccl =
speedup_vs_nccl, this tok/s / nccl's; paid = comm_paid, the share of the communication cost still paid
in time per token, (1/tok/s - nocomm's) / (nccl's - nocomm's) (0%: all hidden; the table shows it on a GPU
only: CPU timings mean nothing); step_ms = step_ms_median (wall time of a step: scheduling,
prepare, forward, LM head, token exchange), step_ms_p99; host% = host_ms_median / gpu_ms_median, where
host_ms = Python time scheduling, preparing (metadata to the device) and committing a step
(perf_counter) and gpu_ms = the forward + LM head on the stream (CUDA events; on the CPU perf_counter
around them); launch_ms_median = host time issuing the forward; ttft = ttft_ms_median (p99 in rows):
time to first token from submission; tpot = tpot_ms_median: mean time between a request's later
tokens; check = correct (--check): every strategy but nocomm against the float64 reference
for the first --check-requests requests: CPU, identical tokens (check_tokens_equal) and logits within
tolerance; GPU (bf16), the logits of the first and last output step within tolerance
(check_logits_rel_err); MoE models: the reference follows the engine's routing where its own is a
near-tie (tw/reference.forward). Step times are rank 0's (every step ends with a TP allgather, so ranks are in
step); host and GPU medians are the slowest rank's.
"""
from __future__ import annotations

from experiments import common, emulated, tuned_choices, workloads
from experiments.throughput_check import check, check_refs
from experiments.throughput_serve import serve, step_stats
from tw.model import config
from tw.runtime import dist
from tw.serve import engine, lm_head
from tw.schedule import strategies as schedules
from tw.schedule import split as splitting
from tw.model.model import memory_estimate

DEFAULT_STRATEGIES = ["nccl", "nocomm", "fused", "tokenweave"]
DEFAULTS = {  # flag: (GPU, CPU); the CPU path checks correctness, so it runs a small workload
    "requests": (1000, 16), "input_len": ([512, 1024, 2048], [48]), "output_len": (128, 8),
    "chunk": ([2048], [128]), "warmup_steps": (5, 0), "min_split_tokens": (None, 64)}   # None: tw/split.min_split_tokens
CPU_KV_TOKENS = 8192


def parse_args(argv=None):
    p = common.parser("throughput", __doc__)
    common.add_model_flags(p)
    p.add_argument("--strategies", nargs="+", default=None, metavar="S",
                   help=f"strategies to compare, from {', '.join(schedules.STRATEGIES)} (finegrained<k>: k token "
                        f"chunks); nccl is the baseline of vs_nccl (default: {' '.join(DEFAULT_STRATEGIES)})")
    p.add_argument("--workload", nargs="+", choices=workloads.KINDS, default=["random"], metavar="W",
                   help="random: fixed --input-len / --output-len; sharegpt-like: the first --requests rows of "
                        "experiments/workloads/sharegpt_like.csv (synthetic, see make_sharegpt_like.py) "
                        "(default: random)")
    p.add_argument("--requests", type=int, default=None, metavar="N",
                   help=f"requests per workload, all submitted at t = 0 (default: {DEFAULTS['requests'][0]} on a "
                        f"GPU, {DEFAULTS['requests'][1]} on the CPU)")
    p.add_argument("--input-len", type=int, nargs="+", default=None, metavar="N",
                   help="random workload: prompt tokens per request, one workload per value (default: "
                        f"{' '.join(map(str, DEFAULTS['input_len'][0]))} on a GPU, "
                        f"{' '.join(map(str, DEFAULTS['input_len'][1]))} on the CPU)")
    p.add_argument("--output-len", type=int, default=None, metavar="N",
                   help=f"random workload: generated tokens per request, ignore_eos (default: "
                        f"{DEFAULTS['output_len'][0]} on a GPU, {DEFAULTS['output_len'][1]} on the CPU)")
    p.add_argument("--chunk", type=int, nargs="+", default=None, metavar="N",
                   help="token budget per step (chunked prefill), one run per value (default: "
                        f"{DEFAULTS['chunk'][0][0]} on a GPU, {DEFAULTS['chunk'][1][0]} on the CPU)")
    p.add_argument("--kv-tokens", type=int, default=None, metavar="N",
                   help="KV-cache capacity in tokens (slots) (default: on a GPU what the free memory holds after "
                        "the model, capped at what the whole workload could use; on the CPU "
                        f"{CPU_KV_TOKENS})")
    p.add_argument("--max-seqs", type=int, default=256, metavar="N",
                   help="requests running at once, at most (as vLLM's max_num_seqs)")
    p.add_argument("--max-steps", type=int, default=100000, metavar="N",
                   help="safety bound: a workload that would take more steps is refused before it runs")
    p.add_argument("--warmup-steps", type=int, default=None, metavar="N",
                   help="untimed steps of each workload per strategy before its timed run (default: "
                        f"{DEFAULTS['warmup_steps'][0]} on a GPU, {DEFAULTS['warmup_steps'][1]} on the CPU)")
    p.add_argument("--check", action="store_true",
                   help="compare the generated tokens / logits of the first --check-requests requests with the "
                        "float64 reference (tw/reference.generate); nocomm is skipped")
    p.add_argument("--check-requests", type=int, default=4, metavar="N",
                   help="requests that --check compares (at least 1)")
    p.add_argument("--split", choices=("tuned", "wave", "naive"), default="tuned",
                   help="tokenweave's split: tuned = experiments/tuned/ for this exact setting (seq_len = the "
                        "chunk) and token count, else wave; wave = the wave-aware rule from the GEMM profile, "
                        "rows rounded up to 64 (the CPU: naive); naive = T // 2")
    p.add_argument("--min-split-tokens", type=int, default=None, metavar="N",
                   help="tokenweave splits only steps of at least this many tokens, smaller ones run unsplit "
                        f"(fused) (default: the paper's threshold on a GPU, {splitting.MIN_SPLIT_TOKENS['dense']} for "
                        f"dense models, {splitting.MIN_SPLIT_TOKENS['moe']} for MoE; "
                        f"{DEFAULTS['min_split_tokens'][1]} on the CPU, so that its small steps split)")
    common.add_run_flags(p)
    gpu = common.gpu_group(p)
    common.add_transport_flag(gpu)
    common.add_ctas_flags(gpu)
    return p.parse_args(argv)


def fill_defaults(args, world) -> None:
    i = 0 if world.is_gpu else 1
    for name, values in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, values[i])


def validate(args, world) -> None:
    """User errors, before anything is built (each names its flag)."""
    args._strategies_given = args.strategies is not None
    args.strategies = args.strategies or list(DEFAULT_STRATEGIES)
    common.validate_strategies(args.strategies)
    emulated.emulation_strategies(args)
    low = {"requests": 1, "input_len": 1, "output_len": 1, "chunk": world.tp_size, "kv_tokens": 1, "max_seqs": 1,
           "max_steps": 1, "warmup_steps": 0, "check_requests": 0, "min_split_tokens": 2}
    why = {"chunk": " (the TP degree: a step has at least one token per rank)", "min_split_tokens": " (two halves)"}
    for flag, least in low.items():
        v = getattr(args, flag)
        if v is not None and min(v if isinstance(v, list) else [v]) < least:
            raise dist.UsageError(f"--{flag.replace('_', '-')} must be >= {least}{why.get(flag, '')}, got {v}")
    common.check_ctas(args, world)
    if args.check and args.check_requests == 0:
        raise dist.UsageError("--check with --check-requests 0 would check nothing; give at least 1 (default: 4)")
    if args.check and args.shard_as_tp not in (None, world.tp_size):
        raise dist.UsageError(f"--check with --shard-as-tp {args.shard_as_tp}: emulated shards do not compute the "
                              "model, so there is no reference to check against; drop one of them")
    if "sharegpt-like" in args.workload and args.requests > len(workloads.table()):
        raise dist.UsageError(f"--requests {args.requests}: the sharegpt-like table has {len(workloads.table())} rows")


def build_workloads(args, vocab: int) -> list:
    out = []
    for kind in args.workload:
        if kind == "random":
            out += [workloads.random(args.requests, n, args.output_len, vocab, args.seed) for n in args.input_len]
        else:
            out.append(workloads.sharegpt_like(args.requests, vocab, args.seed))
    return out


def kv_tokens(args, world, cfg, chunk: int, transports: int, ref_tokens: int, loads: list) -> int:
    """--kv-tokens, or the default: on a GPU what 85% of the free memory holds beside the model and the
    LM head (experiments/common's estimate, the smallest over ranks), capped at the whole workload's
    need; on the CPU a small fixed cache. Refuses a request that could never fit (user error)."""
    need = max(w.kv_need_total for w in loads)
    shard = config.ShardConfig(cfg, args.shard_as_tp or world.tp_size, world.tp_rank)
    dtype_bytes = 2 if world.is_gpu else 4
    ref = ref_tokens if world.rank == 0 else 0

    def estimate(kv):
        extra = lm_head.memory_bytes(cfg, world.tp_size, chunk, dtype_bytes)
        extra += cfg.vocab * cfg.hidden * 12 if ref else 0   # the reference's LM head, float32 + float64
        return memory_estimate(cfg, shard, chunk, kv, dtype_bytes, transports, ref, ref)["total"] + extra

    limit, source = common._available_bytes(world)
    if args.kv_tokens is not None:
        kv = args.kv_tokens
    elif world.is_gpu:
        per_slot = estimate(1) - estimate(0)
        fit = world.comm.allreduce(int((0.85 * limit - estimate(0)) // per_slot), op=_min())
        if fit < 1:
            raise dist.UsageError(f"{cfg.name} leaves no memory for a KV cache ({source}: {limit / 2**30:.1f} GiB); "
                                  "use fewer --layers or a smaller --chunk")
        kv = min(fit, need)
    else:
        kv = CPU_KV_TOKENS
    for w in loads:
        if w.kv_need_max > kv:
            what = (f"--input-len {w.input_len} + --output-len {w.output_len}" if w.kind == "random"
                    else "the longest sharegpt-like request")
            raise dist.UsageError(f"{what} = {w.kv_need_max} KV slots per request, more than the KV capacity of "
                                  f"{kv} tokens (--kv-tokens): such a request could never be admitted")
    total = world.comm.allreduce(estimate(kv), op=common._max())
    if total > 0.9 * limit:
        raise dist.UsageError(f"{cfg.name} with --chunk {chunk} and {kv} KV tokens needs ~{total / 2**30:.1f} GiB per "
                              f"rank with the LM head, but {limit / 2**30:.1f} GiB is free ({source}); use a smaller "
                              "--kv-tokens, --chunk or --layers")
    return kv


class Ceil64Profile:
    """The GEMM profile at M rounded up to a multiple of 64 rows (at most `cap`, the workspace). A GEMM's
    wave count is ceil(M / tile) with tile heights that are multiples of 64, so ceil64(M) has the same
    tile count: the staircase the wave rule looks for is kept, and a run whose steps have hundreds of
    different sizes profiles at most chunk / 64 row counts (seconds) instead of every T - s."""

    def __init__(self, inner, cap: int):
        self.inner, self.cap = inner, cap

    def _m(self, m) -> int:
        return min(-(-int(m) // 64) * 64, self.cap)

    def __call__(self, m: int) -> float:
        return self.inner(self._m(m))

    def prefetch(self, ms) -> None:
        self.inner.prefetch(sorted({self._m(m) for m in ms}))


def make_strategies(args, world, model) -> list:
    out = []
    for name in args.strategies:
        profile = None
        if name == "tokenweave" and args.split != "naive" and world.is_gpu:   # the wave rule's profile
            from tw.schedule.profile import GemmProfile
            profile = Ceil64Profile(GemmProfile(model), model.max_tokens)
        out.append(schedules.make(name, model, world, args.transport, args.ctas, split=args.split,
                                  ctas_mlp=args.ctas_mlp, profile=profile, min_split_tokens=args.min_split_tokens,
                                  p2p=common.p2p_options(args)))
    return out


def plan_splits(world, strat, sizes: list) -> None:
    """Decide tokenweave's split for every batch size the run will see, before it is timed (the
    scheduler never looks at token values, so engine.dry_run gives exactly those sizes; the split
    rule remembers each size's answer)."""
    policy = strat.policy
    todo = sorted({n for n in sizes if policy.by_rule(n)})
    profile = policy.rule.profile
    with dist.step("tokenweave: splits of the run's batch sizes"):
        if profile is not None and todo:
            world.print0(f"tokenweave: GEMM profile for {len(todo)} batch sizes (rows rounded up to 64) ...")
            if world.tp_rank == 0:
                profile.prefetch({m for n in todo for s in splitting.candidates(n) for m in (s, n - s)})
        for n in todo:
            policy.rule(n)


def run_one(args, world, cfg, model, head, strat, stream, chunk, load, steps, kv, refs) -> dict:
    """One strategy on one workload: warm-up steps, the timed run, its row (and check)."""
    label = f"chunk={chunk} {load.name} {strat.name}"
    if strat.name == "tokenweave":
        plan_splits(world, strat, steps)
    if args.warmup_steps:
        serve(strat, model, head, world, load.requests, chunk, kv, args, stream, label, stop_after=args.warmup_steps)
    sched, records, logits, routing = serve(strat, model, head, world, load.requests, chunk, kv, args, stream, label,
                                            capture=set(refs))
    row = {"chunk": chunk, "workload": load.name, "workload_kind": load.kind, "input_len": load.input_len,
           "output_len": load.output_len, "requests": len(load.requests), "kv_tokens": kv,
           "max_seqs": args.max_seqs, "strategy": strat.name, "transport": strat.comm.name,
           "min_split_tokens": args.min_split_tokens, "warmup_steps": args.warmup_steps,
           **engine.summary(sched.finished), **step_stats(world, records)}
    if refs and strat.name != "nocomm":
        row.update(check(args, world, cfg, model, refs, sched, logits, routing))
    world.print0(f"  {label}: {row['total_tokens_per_s']:,.0f} tok/s, step {row['step_ms_median']:.2f} ms, "
                 f"host/gpu {row['host_over_gpu']:.1%}"
                 + (f", check {'ok' if row['correct'] else 'FAIL'}" if "correct" in row else ""))
    return row


def main(argv=None):
    args = parse_args(argv)
    world = common.init(args)
    fill_defaults(args, world)
    cfg = common.model_config(args, world)
    if args.min_split_tokens is None:
        args.min_split_tokens = splitting.min_split_tokens(cfg)
    validate(args, world)
    common.shared_gpu_strategies(args, world)
    common.note_tp1(world)
    loads = build_workloads(args, cfg.vocab)
    chunk = max(args.chunk)
    ref_tokens = max(w.kv_need_max for w in loads) if args.check else 0
    kv = kv_tokens(args, world, cfg, chunk, len(args.strategies), ref_tokens, loads)
    sizes = {}
    for c in args.chunk:
        for w in loads:
            sizes[c, w.name] = engine.dry_run(w.requests, c, kv, args.max_seqs, args.max_steps)
            if len(sizes[c, w.name]) > args.max_steps:
                raise dist.UsageError(f"{w.name} at --chunk {c} takes more than --max-steps {args.max_steps} steps")
    model = common.build_model(args, world, cfg, chunk, kv, transports=len(args.strategies),
                               reference_tokens=ref_tokens, seq_len=ref_tokens)
    head = lm_head.LMHead(cfg, world, args.seed, model.dtype, model.xp, max_rows=chunk)
    strategies = make_strategies(args, world, model)
    stream = world.new_stream()
    writer = common.writer(args, world, "throughput", cfg, dtype=str(model.dtype), check_against="float64 reference")
    rows, order, refs_of = [], {s.name: i for i, s in enumerate(strategies)}, {}
    for c in args.chunk:
        tuned_choices.use(args, world, cfg, strategies, c)   # tuned with seq_len = the chunk
        for load in loads:
            world.print0(f"\n{load.name}: {len(load.requests)} requests, chunk {c}, {kv} KV slots, "
                         f"{len(sizes[c, load.name])} steps each")
            # Strategies in an order rotated by one per workload: slow drifts of the machine do not
            # always favour the same one (each run takes seconds, too long to interleave).
            k = len(rows) // len(strategies) % len(strategies)
            if load.name not in refs_of:     # the same for every chunk size
                refs_of[load.name] = check_refs(args, world, cfg, model, load)
            refs = refs_of[load.name]
            point = [run_one(args, world, cfg, model, head, strat, stream, c, load, sizes[c, load.name], kv, refs)
                     for strat in strategies[k:] + strategies[:k]]
            rows += sorted(point, key=lambda r: order[r["strategy"]])
    base = {(r["chunk"], r["workload"]): r["total_tokens_per_s"] for r in rows if r["strategy"] == "nccl"}
    bound = {(r["chunk"], r["workload"]): r["total_tokens_per_s"] for r in rows if r["strategy"] == "nocomm"}
    inv = lambda v: 1.0 / v if v else None   # noqa: E731 (seconds per token)
    for r in rows:
        key = (r["chunk"], r["workload"])
        b = base.get(key)
        r["speedup_vs_nccl"] = r["total_tokens_per_s"] / b if b else None
        if r["strategy"] not in ("nccl", "nocomm"):
            r["comm_paid"] = common.comm_paid(inv(r["total_tokens_per_s"]), inv(b), inv(bound.get(key)))
        writer.write(r)
    print_table(world, rows, cfg, model.emulated and args.shard_as_tp)
    world.print0(f"wrote {writer.path}")
    failed = [(r["chunk"], r["workload"], r["strategy"]) for r in rows if r.get("correct") is False]
    if failed:
        world.print0(f"CHECK FAILED for {failed}")
        return 1
    return 0


def print_table(world, rows, cfg, shard_as_tp=None):
    world.print0(f"\n{cfg.name}, {cfg.num_layers} layers, TP={world.tp_size}, {world.device}, eager"
                 + (f", EMULATED shards of TP={shard_as_tp}" if shard_as_tp else "")
                 + ("" if world.is_gpu else " (CPU: timings mean nothing)")
                 + (" (TW_SHARE_GPU=1: ranks share one GPU, timings mean nothing)" if world.shared_gpu else ""))
    load, strat = (max([w] + [len(r[k]) for r in rows]) for w, k in ((22, "workload"), (12, "strategy")))
    world.print0(f"{'chunk':>6} {'workload':<{load}} {'strategy':<{strat}} {'tok/s':>10} {'out_tok/s':>10} "
                 f"{'vs_nccl':>8} {'paid':>6} {'step_ms':>8} {'host%':>6} {'ttft_ms':>9} {'tpot_ms':>8} {'check':>6}")
    for r in rows:
        sp = f"{r['speedup_vs_nccl']:.3f}x" if r.get("speedup_vs_nccl") else "-"
        ok = ("ok" if r["correct"] else "FAIL") if "correct" in r else "-"
        tpot = f"{r['tpot_ms_median']:.2f}" if "tpot_ms_median" in r else "-"
        # CPU timings mean nothing: a share of them would only mislead.
        paid = f"{100 * r['comm_paid']:.0f}%" if r.get("comm_paid") is not None and world.is_gpu else "-"
        world.print0(f"{r['chunk']:>6} {r['workload']:<{load}} {r['strategy']:<{strat}} {r['total_tokens_per_s']:>10,.0f} "
                     f"{r['output_tokens_per_s']:>10,.0f} {sp:>8} {paid:>6} {r['step_ms_median']:>8.2f} "
                     f"{100 * r['host_over_gpu']:>5.1f}% {r['ttft_ms_median']:>9.1f} {tpot:>8} {ok:>6}")
    world.print0("columns: see python -m experiments.throughput --help")


def _min():
    from mpi4py import MPI
    return MPI.MIN


if __name__ == "__main__":
    dist.shutdown(main())
