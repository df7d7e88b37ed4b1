"""What the fused kernel's CTAs cost the GEMMs they overlap: the SM-steal cost behind tokenweave's
gap to nocomm (experiments/NOTES.md).

    mpirun -n 2 python -m experiments.interference --tokens 2048 4096 8192 --ctas 8 16 32

Per token count M and CTA budget k, on every rank at once (llama3-70b shapes by default):
- gemm_ms: layer 0's four GEMMs on M rows alone, on the compute stream;
- comm_ms: the fused P2P AllReduce + add + RMSNorm of M rows alone, k CTAs, on a high-priority
  stream (the same call tokenweave overlaps: one half's comm under the other half's GEMMs);
- overlapped: the comm launched first on its stream and the GEMMs right after on theirs, as in
  tokenweave; events on each stream give gemm_ov_ms and comm_ov_ms, and wall_ms for the pair.
Derived: steal_ms = gemm_ov_ms - gemm_ms (what the overlap cost the GEMMs' own stream);
exposed_ms = wall_ms - gemm_ms (what the overlapped comm added to the pair: steal plus any comm tail);
sm_bound_ms = comm_ov_ms * k / SMs (the GEMMs' loss if they lost exactly the SMs the comm holds
while it runs); hidden = (comm_ms + gemm_ms - wall_ms) / comm_ms (the share of the comm that
disappeared under the GEMMs). steal_ms above sm_bound_ms means contention beyond the SMs (HBM, L2,
CTA scheduling); below it, the comm hides in the GEMMs' wave tails.
All three configurations (GEMMs alone, comm alone, overlapped) are measured the same way, round-robin
in rotating order: each sample starts after a device sync and an MPI barrier (both ranks' comm kernels
start together) with every launch queued behind a 1 ms hold kernel (no host gaps inside the timing).
Slowest rank's median of --iters. (The first version timed the alone cases back to back and only the
overlapped one after a sync: host launch gaps and clock drift then dominated the differences.)
GPU only (there is no second stream to overlap on the CPU).
Rows: tokens, ctas, sms, gemm_ms, comm_ms, gemm_ov_ms, comm_ov_ms, wall_ms, steal_ms, exposed_ms,
sm_bound_ms, hidden.
"""
from __future__ import annotations

import argparse

import numpy as np

from tw import bench, config, dist, results, schedules
from tw.layers import layer_gemms
from tw.model import Model
from tw.split import fill_random


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="mpirun -n <TP> python -m experiments.interference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3-70b", help=f"model preset, from {sorted(config.PRESETS)}")
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192],
                   help="rows M of the GEMMs and of the comm (tokenweave's half-batch sizes)")
    p.add_argument("--ctas", type=int, nargs="+", default=[8, 16, 32], help="CTA budgets of the fused kernel")
    p.add_argument("--shard-as-tp", type=int, default=None, help="weight shards sized as at this TP degree")
    p.add_argument("--iters", type=int, default=20, help="timed samples per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed samples first")
    p.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto", help="auto: GPU if usable")
    p.add_argument("--out", default=None, help="result file (JSON lines)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    world = dist.init(None, args.device)
    if not world.is_gpu:
        world.print0("experiments.interference needs GPUs: it overlaps two CUDA streams, which the CPU "
                     "fallback does not have. Run it with one MPI rank per GPU.")
        return 2
    import cupy as cp
    cfg = config.get(args.model, 1)
    model = Model(cfg, world, max(args.tokens), seed=0, shard_as_tp=args.shard_as_tp)
    from tw.comm.p2p import P2PComm
    comm = schedules.make_comm("p2p", model, world)
    if not isinstance(comm, P2PComm):
        world.print0("P2P is unavailable here (see the warning above): nothing to measure")
        return 2
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    compute = world.new_stream()
    side = cp.cuda.Stream(non_blocking=True, priority=-100)  # clamped to the highest priority
    fill_random(model.ws, ("x", "attn", "act"))
    hidden, m_max = cfg.hidden, max(args.tokens)
    staging = comm.staging(m_max)
    staging[...] = cp.random.standard_normal(staging.shape, dtype=cp.float32).astype(staging.dtype)
    residual = cp.random.standard_normal((m_max, hidden), dtype=cp.float32).astype(staging.dtype)
    weight = model.layers[0].post_norm
    out = comm.output(m_max)
    cp.cuda.Device().synchronize()
    writer = results.Writer(args.out or results.default_path("interference", f"{cfg.name}-tp{world.tp_size}"),
                            results.metadata(world, model=cfg.name, shard_as_tp=args.shard_as_tp,
                                             iters=args.iters, warmup=args.warmup, experiment="interference"),
                            world.rank)

    def slowest_median(samples) -> float:
        return bench.summarize(np.asarray(samples), world.comm)["median_ms"]

    world.print0(f"{'tokens':>7} {'ctas':>4} {'gemm ms':>8} {'comm ms':>8} {'gemm ov':>8} {'comm ov':>8} "
                 f"{'wall':>8} {'steal':>7} {'exposed':>7} {'SM-bound':>8} {'hidden':>6}")

    def sample(gemms, fused, run_gemm: bool, run_comm: bool):
        """One measured sample (GEMM ms, comm ms, wall ms; 0 for a part not run). Both ranks start
        together (sync + barrier) and everything is queued behind a 1 ms hold, so host launch gaps
        stay out of all three configurations alike."""
        ev = [cp.cuda.Event() for _ in range(6)]
        cp.cuda.Device().synchronize()
        world.tp_comm.Barrier()
        bench.hold(compute)
        ev[0].record(compute)
        side.wait_event(ev[0])
        ev[1].record(side)
        if run_comm:
            fused()
        ev[2].record(side)
        ev[3].record(compute)
        if run_gemm:
            gemms()
        ev[4].record(compute)
        compute.wait_event(ev[2])
        ev[5].record(compute)
        ev[5].synchronize()
        return [cp.cuda.get_elapsed_time(ev[3], ev[4]), cp.cuda.get_elapsed_time(ev[1], ev[2]),
                cp.cuda.get_elapsed_time(ev[0], ev[5])]

    configs = ((True, False), (False, True), (True, True))  # GEMMs alone, comm alone, overlapped
    for m in args.tokens:
        gemms, _ = layer_gemms(model, m, compute)
        for k in args.ctas:
            def fused(k=k, m=m):
                comm.ar_add_norm(0, m, residual, weight, cfg.eps, out, stream=side, ctas=k)

            samples = {c: [] for c in configs}
            for i in range(args.warmup + args.iters):
                for j in range(len(configs)):  # round-robin, rotated each round: drift hits all alike
                    c = configs[(i + j) % len(configs)]
                    t = sample(gemms, fused, *c)
                    if i >= args.warmup:
                        samples[c].append(t)
            comm.check()
            alone_g, alone_c, both = (np.asarray(samples[c]) for c in configs)
            gemm_ms, comm_ms = slowest_median(alone_g[:, 0]), slowest_median(alone_c[:, 1])
            gemm_ov, comm_ov, wall = (slowest_median(both[:, j]) for j in range(3))
            row = {"tokens": m, "ctas": k, "sms": sms, "gemm_ms": gemm_ms, "comm_ms": comm_ms,
                   "gemm_ov_ms": gemm_ov, "comm_ov_ms": comm_ov, "wall_ms": wall, "steal_ms": gemm_ov - gemm_ms,
                   "exposed_ms": wall - gemm_ms, "sm_bound_ms": comm_ov * k / sms,
                   "hidden": (comm_ms + gemm_ms - wall) / comm_ms}
            writer.write(row)
            world.print0(f"{m:>7} {k:>4} {gemm_ms:>8.3f} {comm_ms:>8.3f} {gemm_ov:>8.3f} {comm_ov:>8.3f} "
                         f"{wall:>8.3f} {row['steal_ms']:>7.3f} {row['exposed_ms']:>7.3f} "
                         f"{row['sm_bound_ms']:>8.3f} {row['hidden']:>6.1%}")
    world.print0(f"wrote {writer.path}")
    return 0


if __name__ == "__main__":
    dist.shutdown(main())
