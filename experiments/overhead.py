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

import argparse

from tw import batch as batching
from tw import bench, config, dist, ops, results, schedules
from tw.model import Model


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="mpirun -n <TP> python -m experiments.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model preset (default: llama3-70b on GPU, tiny on CPU)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers per forward pass")
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="token counts (default: 1024 2048 4096 8192 16384 on GPU, 64 256 on CPU)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per prefill sequence")
    p.add_argument("--shard-as-tp", type=int, default=None, help="weight shards sized as at this TP degree")
    p.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto", help="auto: GPU if usable")
    p.add_argument("--iters", type=int, default=20, help="timed repetitions per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed repetitions first")
    p.add_argument("--out", default=None, help="result file (JSON lines)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    world = dist.init(None, args.device)
    gpu = world.is_gpu
    cfg = config.get(args.model or ("llama3-70b" if gpu else "tiny"), args.layers)
    tokens_list = args.tokens or ([1024, 2048, 4096, 8192, 16384] if gpu else [64, 256])
    if not gpu:
        world.print0("NO GPU: CPU fallback, the shares below mean nothing for GPUs")
    stream = world.new_stream()
    model = Model(cfg, world, max(tokens_list), seed=0, shard_as_tp=args.shard_as_tp)
    nccl, nocomm = (schedules.make(s, model, world) for s in ("nccl", "nocomm"))
    writer = results.Writer(args.out or results.default_path("overhead", f"{cfg.name}-tp{world.tp_size}"),
                            results.metadata(world, model=cfg.name, layers=cfg.num_layers,
                                             shard_as_tp=args.shard_as_tp, iters=args.iters), world.rank)

    def timed(fn):
        return bench.median_ms(fn, world, stream, args.iters, args.warmup)

    world.print0(f"{'tokens':>7} {'nccl ms':>9} {'nocomm ms':>9} {'comm share':>10} {'AR alone':>9} "
                 f"{'norm alone':>10}")
    for tokens in tokens_list:
        batch = batching.prefill(tokens, args.seq_len)
        ids = batching.token_ids(tokens, cfg.vocab, 0)
        t = {}
        for strat in (nccl, nocomm):
            plan = strat.prepare(batch, ids)
            t[strat.name] = timed(lambda strat=strat, plan=plan: strat.forward(plan, stream))
        n_ops = 2 * cfg.num_layers
        ws, w = model.ws, model.layers[0]

        def allreduces():
            for _ in range(n_ops):
                nccl.comm.all_reduce(0, tokens, stream)

        def norms():
            for _ in range(n_ops):
                # in place into x: each thread reads its vectors of x before writing them
                ops.add_rmsnorm(ws.x[:tokens], ws.residual[:tokens], w.post_norm, cfg.eps, ws.x[:tokens], stream)

        row = {"tokens": tokens, "nccl_ms": t["nccl"], "nocomm_ms": t["nocomm"],
               "comm_share": 1 - t["nocomm"] / t["nccl"], "allreduce_ms": timed(allreduces),
               "norm_ms": timed(norms)}
        row["allreduce_share"] = row["allreduce_ms"] / t["nccl"]
        row["norm_share"] = row["norm_ms"] / t["nccl"]
        writer.write(row)
        world.print0(f"{tokens:>7} {t['nccl']:>9.3f} {t['nocomm']:>9.3f} {row['comm_share']:>10.1%} "
                     f"{row['allreduce_share']:>9.1%} {row['norm_share']:>10.1%}")
    world.print0(f"wrote {writer.path}")
    return 0


if __name__ == "__main__":
    dist.shutdown(main())
