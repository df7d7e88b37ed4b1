"""How much of a forward pass the all-reduces and the RMSNorms cost (the paper's Fig. 1 and 3).

    mpirun -n 2 python -m experiments.overhead --models llama3-70b qwen2.5-72b --layers 4 --runs 5

Per model and token count, the nccl schedule (GEMM -> NCCL all-reduce -> add + RMSNorm, one stream) is
timed whole and with one piece of every layer's work left out, as the paper's ablations do:

| kind         | left out, in every layer                                                            |
|--------------|-------------------------------------------------------------------------------------|
| baseline     | nothing: exactly the latency job's nccl strategy                                    |
| no_attn_ar   | the all-reduce after o_proj (add + RMSNorm then run on the unreduced partial sums)  |
| no_mlp_ar    | the all-reduce after down_proj                                                      |
| no_attn_norm | the add + RMSNorm after attention: the kernel is skipped, x stays as it was         |
| no_mlp_norm  | the add + RMSNorm after the MLP (the next layer's input norm, or the final norm)    |
| nocomm       | both all-reduces (the latency job's nocomm: the same kernels)                       |

A removed norm skips the whole add + RMSNorm kernel and leaves x (the block's normed input) and the
residual as they were: shapes and the data flow stay valid and every other kernel runs on the same
number of rows, while a residual add without the normalisation would keep most of the kernel's memory
traffic and so not remove its cost. Like nocomm, every ablation's output is not the model's; each row
says how far it is from the baseline's (rel_diff_vs_baseline) and how many all-reduces and add + RMSNorm
kernels one pass issued (counted at the transport, allreduces / norms).

    comm_overhead = ((t_base - t_no_attn_ar) + (t_base - t_no_mlp_ar)) / t_base
    norm_overhead = ((t_base - t_no_attn_norm) + (t_base - t_no_mlp_norm)) / t_base

Each of --runs runs times every configuration round-robin (--repeats rounds of --iters passes, rotated
order, slowest rank's median: tw/measure/bench.py); a kind's number per run is that median, and rows give the
mean and sample standard deviation over the runs. The overheads are computed per run, then averaged.

Also timed in every run, as before: 2 x layers NCCL all-reduces of [T, hidden] alone, and 2 x layers
fused add + RMSNorm kernels on [T, hidden] alone (the work TokenWeave's reordering cuts to 1/TP).

Rows: kind = one of the six above: run_median_ms (one per run), mean_ms, std_ms, allreduces, norms,
rel_diff_vs_baseline. kind = summary, one per model and token count: comm_overhead_mean / _std,
norm_overhead_mean / _std, and the earlier file's columns (means over the runs): nccl_ms, nocomm_ms,
comm_share = 1 - nocomm / nccl, allreduce_ms, allreduce_share, norm_ms, norm_share (shares of nccl_ms).
"""
from __future__ import annotations

import numpy as np

from experiments import common, emulated
from tw.model import batch as batching
from tw import ops
from tw.measure import bench
from tw.runtime import dist, graph
from tw.schedule import strategies as schedules
from tw.comm import check_range

GPU_MODELS = ("llama3-70b", "qwen2.5-72b")
KINDS = {  # kind -> (blocks whose all-reduce is left out, blocks whose add + RMSNorm is left out)
    "baseline": ((), ()), "no_attn_ar": (("attn",), ()), "no_mlp_ar": (("mlp",), ()),
    "no_attn_norm": ((), ("attn",)), "no_mlp_norm": ((), ("mlp",)), "nocomm": (("attn", "mlp"), ()),
}
OVERHEADS = {"comm_overhead": ("no_attn_ar", "no_mlp_ar"), "norm_overhead": ("no_attn_norm", "no_mlp_norm")}


def parse_args(argv=None):
    p = common.parser("overhead", __doc__)
    common.add_model_flags(p, models=GPU_MODELS)
    common.add_tokens_flag(p, gpu=[1024, 2048, 4096, 8192, 16384], cpu=[64, 256])
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per prefill sequence")
    p.add_argument("--runs", type=int, default=5,
                   help="independent timed runs, each timing every configuration round-robin (--repeats rounds); "
                        "rows give the mean and standard deviation of the per-run medians")
    # 5 runs x 2 rounds x 10 passes = 100 samples per kind (the single run before: 3 x 20); by the
    # committed 4-layer nccl times, two models at 1K-16K tokens then take ~5 min on 2 x H200 (an estimate)
    common.add_timing_flags(p, iters=10, warmup=3, repeats=2)
    common.add_run_flags(p, tp=False)
    return p.parse_args(argv)


class Ablated:
    """A transport that leaves out the all-reduce or the add + RMSNorm of the attention and/or MLP steps
    of tw.schedule.strategies.Sequential (which calls ar_add_norm twice per layer) and counts what it issues.

    Which step a call is comes from its norm weight: the post-attention norm is some layer's post_norm;
    every other call (the next layer's input norm, the final norm) ends an MLP block."""

    def __init__(self, inner, model, skip_ar=(), skip_norm=()):
        self.inner, self.skip_ar, self.skip_norm = inner, set(skip_ar), set(skip_norm)
        self._post = {id(w.post_norm) for w in model.layers}
        self.name, self.sharded, self.max_tokens = inner.name, False, inner.max_tokens
        self.counts = {"allreduces": 0, "norms": 0}

    def staging(self, num_tokens):
        return self.inner.staging(num_tokens)

    def all_reduce(self, start, end, stream=None, ctas=None):
        self.counts["allreduces"] += 1
        self.inner.all_reduce(start, end, stream)

    def ar_add_norm(self, start, end, residual, weight, eps, out, stream=None, sharded=None, ctas=None):
        block = "attn" if id(weight) in self._post else "mlp"
        ar, norm = block not in self.skip_ar, block not in self.skip_norm
        if ar and norm:  # untouched: the baseline's own call (NCCL all-reduce, then the norm kernel)
            self.counts["allreduces"] += 1
            self.counts["norms"] += 1
            self.inner.ar_add_norm(start, end, residual, weight, eps, out, stream, sharded=False)
        elif ar:
            self.all_reduce(start, end, stream)
        elif norm:  # what tw/comm/nocomm.py does: add + RMSNorm of the staging rows as they are
            check_range(start, end, self.max_tokens)
            self.counts["norms"] += 1
            ops.add_rmsnorm(self.inner.staging(end)[start:end], residual[start:end], weight, eps, out[start:end],
                            stream)

    def check(self):
        self.inner.check()

    def close(self):
        pass  # the inner transport is shared: its owner closes it


def strategies(model, world):
    """{kind: a Sequential over an Ablated view of one shared unsharded NCCL transport}."""
    comm = schedules.transport_for("nccl", model, world, sharded=False)
    return comm, {k: schedules.Sequential(k, model, Ablated(comm, model, ar, norm)) for k, (ar, norm) in KINDS.items()}


def timed_runs(fns, args, world, stream, label):
    """{name: [slowest rank's median per run]}: --runs runs, each --repeats round-robin rounds."""
    per_run = {name: [] for name in fns}
    for run in range(args.runs):
        def measure(name, run=run):
            with dist.step(f"overhead {label} run {run + 1}/{args.runs} {name}"):
                return bench.passes(fns[name], world, stream, args.iters, args.warmup)
        for name, samples in bench.round_robin(list(fns), measure, args.repeats).items():
            per_run[name].append(bench.slowest_median(samples, world.comm))
    return per_run


def mean_std(values) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1; None for a single run)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)


def measure_model(args, world, cfg, stream):
    """Every kind and isolated op of one model at every token count; returns the rows written."""
    # transports=3: the one NCCL transport, and room for the comparison of each kind's output with the
    # baseline's (a bf16 copy and float32 temporaries of [T, hidden])
    model = common.build_model(args, world, cfg, max(args.tokens), transports=3)
    comm, strats = strategies(model, world)
    writer = common.writer(args, world, "overhead", cfg)

    def graphed(fn):
        # an MoE block waits on the host for its row counts: no CUDA graph (tw/model/moe.py)
        return graph.Graph(fn, stream) if world.is_gpu and not cfg.num_experts else fn

    rows = []
    for tokens in args.tokens:
        batch = batching.prefill(tokens, args.seq_len)
        ids = batching.token_ids(tokens, cfg.vocab, args.seed)
        fns, first, base_out = {}, {}, None
        for kind, strat in strats.items():  # baseline first
            plan = strat.prepare(batch, ids)
            strat.comm.counts.update(allreduces=0, norms=0)
            with dist.step(f"overhead {cfg.name} tokens={tokens} {kind}: first pass"):
                out = strat.forward(plan, stream)
                if world.is_gpu:
                    stream.synchronize()  # what follows runs on the default stream
                if base_out is None:
                    base_out = out.astype(np.float32)  # the workspace is shared: keep the baseline's
                xp = model.xp
                diff = float(xp.linalg.norm(out.astype(np.float32) - base_out) / xp.linalg.norm(base_out))
                # what one eager pass issued (before any capture), and how far its output is from the baseline's
                diff = world.comm.allreduce(diff, op=common._max())
                first[kind] = {**strat.comm.counts, "rel_diff_vs_baseline": diff}
                fns[kind] = graphed(lambda strat=strat, plan=plan: strat.forward(plan, stream))
        del base_out
        n_ops = 2 * cfg.num_layers
        ws, w = model.ws, model.layers[0]

        def allreduces():
            for _ in range(n_ops):
                comm.all_reduce(0, tokens, stream)

        def norms():
            for _ in range(n_ops):
                # in place into x: each thread reads its vectors of x before writing them
                ops.add_rmsnorm(ws.x[:tokens], ws.residual[:tokens], w.post_norm, cfg.eps, ws.x[:tokens], stream)

        fns.update(allreduce=graphed(allreduces), norm=graphed(norms))
        t = timed_runs(fns, args, world, stream, f"{cfg.name} tokens={tokens}")
        base = np.asarray(t["baseline"])
        for kind in KINDS:
            mean, std = mean_std(t[kind])
            rows.append({"tokens": tokens, "kind": kind, "run_median_ms": t[kind], "mean_ms": mean, "std_ms": std,
                         "runs": args.runs, **first[kind]})
        gain = {k: base - np.asarray(t[k]) for k in KINDS}  # per run: what leaving that piece out saved
        summary = {"tokens": tokens, "kind": "summary", "runs": args.runs}
        for name, (a, b) in OVERHEADS.items():
            summary[f"{name}_mean"], summary[f"{name}_std"] = mean_std((gain[a] + gain[b]) / base)
        nocomm, ar, norm = (np.asarray(t[k]) for k in ("nocomm", "allreduce", "norm"))
        summary.update(nccl_ms=float(base.mean()), nocomm_ms=float(nocomm.mean()),
                       comm_share=float((1 - nocomm / base).mean()), allreduce_ms=float(ar.mean()),
                       allreduce_share=float((ar / base).mean()), norm_ms=float(norm.mean()),
                       norm_share=float((norm / base).mean()))
        rows.append(summary)
        for r in rows[-len(KINDS) - 1:]:
            writer.write(r)
        print_point(world, cfg, rows[-len(KINDS) - 1:])
    world.print0(f"wrote {writer.path}")
    comm.close()
    return rows


def _pm(mean, std, scale=1.0, fmt="{:.3f}"):
    return fmt.format(mean * scale) + ("" if std is None else " +- " + fmt.format(std * scale))


def print_point(world, cfg, rows):
    *kinds, s = rows
    world.print0(f"\n{cfg.name}, {cfg.num_layers} layers, {s['tokens']} tokens, TP={world.tp_size}: mean +- std "
                 f"over {s['runs']} runs" + ("" if world.is_gpu else " (CPU: timings mean nothing)"))
    world.print0(f"  {'kind':<13} {'ms':>18} {'allreduces':>10} {'norms':>6} {'rel_diff':>9}")
    for r in kinds:
        world.print0(f"  {r['kind']:<13} {_pm(r['mean_ms'], r['std_ms']):>18} {r['allreduces']:>10} {r['norms']:>6} "
                     f"{r['rel_diff_vs_baseline']:>9.2e}")
    world.print0(f"  comm overhead {_pm(s['comm_overhead_mean'], s['comm_overhead_std'], 100, '{:.1f}')}% "
                 f"(nocomm: {100 * s['comm_share']:.1f}%, all-reduces alone {100 * s['allreduce_share']:.1f}%); "
                 f"norm overhead {_pm(s['norm_overhead_mean'], s['norm_overhead_std'], 100, '{:.1f}')}% "
                 f"(alone {100 * s['norm_share']:.1f}%)")


def main(argv=None):
    args = parse_args(argv)
    world = common.init(args)
    if emulated.emulation(args) is not None:
        raise dist.UsageError("experiments.overhead measures NCCL's all-reduce share, which an emulated rank cannot "
                              "run; its norm and GEMM shares on one rank come from latency --emulate-tp (nocomm, "
                              "fused) and experiments/NOTES.md's decomposition")
    if args.runs < 1:
        raise dist.UsageError(f"--runs must be >= 1, got {args.runs}")
    if args.seq_len < 1:
        raise dist.UsageError(f"--seq-len must be >= 1, got {args.seq_len}")
    names = args.models or (list(GPU_MODELS) if world.is_gpu else [None])
    layers, cfgs = args.layers, []
    for i, name in enumerate(names):  # every name checked before the first model is built
        args.model, args.layers = name, layers
        cfgs.append(common.model_config(args, world, banner=i == 0))
    stream = world.new_stream()
    for cfg in cfgs:
        args.model, args.layers = cfg.name, cfg.num_layers
        measure_model(args, world, cfg, stream)
        common.release(world)  # the next model's size check sees this one's memory as free
    return 0


if __name__ == "__main__":
    dist.shutdown(main())
