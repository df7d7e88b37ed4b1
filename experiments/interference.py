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
in rotating order (tw/measure/bench.py round_robin, --iters rounds of one sample each): each sample starts after a device sync and an MPI barrier (both ranks' comm kernels
start together) with every launch queued behind a 1 ms hold kernel (no host gaps inside the timing).
Slowest rank's median of --iters. (The first version timed the alone cases back to back and only the
overlapped one after a sync: host launch gaps and clock drift then dominated the differences.)
GPU only (there is no second stream to overlap on the CPU).
Rows: tokens, ctas, sms, gemm_ms, comm_ms, gemm_ov_ms, comm_ov_ms, wall_ms, steal_ms, exposed_ms,
sm_bound_ms, hidden.
"""
from __future__ import annotations

import numpy as np

from experiments import common, emulated
from tw.measure import bench
from tw.runtime import dist
from tw.schedule import strategies as schedules
from tw.model.layers import layer_gemms
from tw.schedule.profile import fill_random


def parse_args(argv=None):
    p = common.parser("interference", __doc__)
    common.add_model_flags(p, layers=False)
    common.add_tokens_flag(p, gpu=[2048, 4096, 8192], cpu=[64],
                           help="rows M of the GEMMs and of the comm (tokenweave's half-batch sizes)")
    p.add_argument("--ctas", type=int, nargs="+", default=[8, 16, 32], help="CTA budgets of the fused kernel")
    p.add_argument("--private-out", action="store_true",
                   help="time the fused call with a private output array (the kernel then ends with a copy of the "
                        "gathered rows), as the files written before the registered output (commit 106afc7) did")
    p.add_argument("--iters", type=int, default=20, help="timed samples per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed samples first")
    common.add_run_flags(p, tp=False)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    world = common.init(args, gpu_only="it overlaps two CUDA streams, which the CPU fallback does not have")
    import cupy as cp
    args.layers = 1
    cfg = common.model_config(args, world)
    model = common.build_model(args, world, cfg, max(args.tokens))
    comm = schedules.transport_for("p2p", model, world, sharded=True, p2p=common.p2p_options(args))
    if comm.name != "p2p":
        world.print0("P2P is unavailable here (see the warning above): nothing to measure")
        return 2
    sms = world.sm_count
    compute = world.new_stream()
    side = cp.cuda.Stream(non_blocking=True, priority=-100)  # clamped to the highest priority
    fill_random(model.ws, ("x", "attn", "act"))
    hidden, m_max = cfg.hidden, max(args.tokens)
    staging = comm.staging(m_max)
    staging[...] = cp.random.standard_normal(staging.shape, dtype=cp.float32).astype(staging.dtype)
    residual = cp.random.standard_normal((m_max, hidden), dtype=cp.float32).astype(staging.dtype)
    weight = model.layers[0].post_norm
    out = cp.empty_like(residual) if args.private_out else comm.output(m_max)
    cp.cuda.Device().synchronize()
    writer = common.writer(args, world, "interference", cfg, out_kind="private" if args.private_out else "registered")
    if emulated.emulation(args) is not None:
        world.print0(emulated.emulation(args).banner)

    world.print0(f"{'tokens':>7} {'ctas':>4} {'gemm_ms':>8} {'comm_ms':>8} {'gemm_ov':>8} {'comm_ov':>8} "
                 f"{'wall_ms':>8} {'steal':>7} {'exposed':>7} {'sm_bound':>8} {'hidden':>6}   (ms; see --help)")

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

            with dist.step(f"interference M={m} ctas={k}"):
                if args.warmup:  # discarded: the same rotation, untimed
                    bench.round_robin(configs, lambda c: [sample(gemms, fused, *c)], args.warmup)
                samples = bench.round_robin(configs, lambda c: [sample(gemms, fused, *c)], args.iters)
            comm.check()
            alone_g, alone_c, both = (np.asarray(samples[c]) for c in configs)
            gemm_ms = bench.slowest_median(alone_g[:, 0], world.comm)
            comm_ms = bench.slowest_median(alone_c[:, 1], world.comm)
            gemm_ov, comm_ov, wall = (bench.slowest_median(both[:, j], world.comm) for j in range(3))
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
