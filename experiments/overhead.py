"""How much of a forward pass the all-reduces and the RMSNorms cost (the paper's Fig. 1 and 3).

    mpirun -n 2 python -m experiments.overhead --model llama3-70b --layers 4 --tokens 1024 4096 16384

Per token count, three measurements on the same model:
- ablation: comm_share = 1 - t(nocomm) / t(nccl), the forward time the all-reduces add;
- isolated all-reduce: 2 x layers NCCL all-reduces of [T, hidden] alone, as a share of t(nccl);
- isolated add + RMSNorm: 2 x layers fused add + RMSNorm kernels on [T, hidden] alone, as a share of
  t(nccl) (the work TokenWeave's reordering cuts to 1/TP per GPU).
Rows: tokens, nccl_ms, nocomm_ms, comm_share, allreduce_ms, allreduce_share, norm_ms, norm_share.
"""
from __future__ import annotations

from experiments import common
from tw import batch as batching
from tw import bench, dist, graph, ops, schedules


def parse_args(argv=None):
    p = common.parser("overhead", __doc__)
    common.add_model_flags(p)
    common.add_tokens_flag(p, gpu=[1024, 2048, 4096, 8192, 16384], cpu=[64, 256])
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per prefill sequence")
    common.add_timing_flags(p, iters=20, warmup=5, repeats=3)
    common.add_run_flags(p, tp=False)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    world = common.init(args)
    cfg = common.model_config(args, world)
    stream = world.new_stream()
    model = common.build_model(args, world, cfg, max(args.tokens), transports=2)
    nccl, nocomm = (schedules.make(s, model, world) for s in ("nccl", "nocomm"))
    writer = common.writer(args, world, "overhead", cfg)

    def graphed(fn):
        return graph.Graph(fn, stream) if world.is_gpu else fn

    world.print0(f"{'tokens':>7} {'nccl_ms':>9} {'nocomm_ms':>9} {'comm_share':>10} {'allreduce_share':>15} "
                 f"{'norm_share':>10}")
    for tokens in args.tokens:
        batch = batching.prefill(tokens, args.seq_len)
        ids = batching.token_ids(tokens, cfg.vocab, 0)
        fns = {}
        for strat in (nccl, nocomm):
            plan = strat.prepare(batch, ids)
            fns[strat.name] = graphed(lambda strat=strat, plan=plan: strat.forward(plan, stream))
        n_ops = 2 * cfg.num_layers
        ws, w = model.ws, model.layers[0]

        def allreduces():
            for _ in range(n_ops):
                nccl.comm.all_reduce(0, tokens, stream)

        def norms():
            for _ in range(n_ops):
                # in place into x: each thread reads its vectors of x before writing them
                ops.add_rmsnorm(ws.x[:tokens], ws.residual[:tokens], w.post_norm, cfg.eps, ws.x[:tokens], stream)

        fns.update(allreduce=graphed(allreduces), norm=graphed(norms))
        with dist.step(f"overhead tokens={tokens}"):
            t = {k: v["median_ms"] for k, v in bench.timed(fns, world, stream, args.iters, args.warmup,
                                                             args.repeats).items()}
        row = {"tokens": tokens, "nccl_ms": t["nccl"], "nocomm_ms": t["nocomm"],
               "comm_share": 1 - t["nocomm"] / t["nccl"], "allreduce_ms": t["allreduce"], "norm_ms": t["norm"]}
        row["allreduce_share"] = row["allreduce_ms"] / t["nccl"]
        row["norm_share"] = row["norm_ms"] / t["nccl"]
        writer.write(row)
        world.print0(f"{tokens:>7} {t['nccl']:>9.3f} {t['nocomm']:>9.3f} {row['comm_share']:>10.1%} "
                     f"{row['allreduce_share']:>15.1%} {row['norm_share']:>10.1%}")
    world.print0(f"wrote {writer.path}")
    return 0


if __name__ == "__main__":
    dist.shutdown(main())
