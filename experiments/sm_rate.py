"""Per-SM copy rate: how many bytes k CTAs move through this GPU's own memory per second.

    python -m experiments.sm_rate --ctas 1 2 4 8 16 32 132 --mib 1024

One GPU, one process (no MPI launch needed). For each CTA count k, cuda/copy_rate.cu copies a --mib
MiB buffer into a second one with 16-byte loads and stores (512 threads per CTA, 8 loads in flight per
thread, grid-stride). Each CTA gets enough (unused) dynamic shared memory that no two fit on one SM, so
k CTAs <= the SM count run on k distinct SMs (--shared-ctas drops that and lets the scheduler pack them).
This rate is the floor of every SM-based comm kernel: bytes through the SMs / (SMs x per-SM rate)
(docs/design.md#targets, docs/hardware.md#measured).

Timing: CUDA events around each call (tw.measure.bench.time_gpu: --warmup untimed calls, then --iters timed
ones), the CTA counts taken round-robin over --rounds rounds in rotating order so clock drift hits all
alike; the median of all timed calls. After timing, dst is compared with src (a wrong copy is reported
as correct=false, never as a rate).

Columns (one JSON-lines row per CTA count, with the run's metadata):
  ctas         CTAs launched (k)
  sms          SMs the copy can occupy: min(k, SM count)
  bytes        bytes per call, read + written (2 x --mib MiB)
  ms           median time of one call, ms (min_ms, max_ms too)
  gbps         bytes / time, GB/s (1e9 bytes per second)
  gbps_per_sm  gbps / sms, GB/s per SM
  one_per_sm   whether the launch forced one CTA per SM; smem_bytes the dynamic shared memory per CTA
  correct      dst == src after the timed calls
"""
from __future__ import annotations

import numpy as np

from experiments import common
from tw.measure import bench
from tw.runtime import dist, kernels

THREADS = 512  # kThreads in cuda/copy_rate.cu


def parse_args(argv=None):
    p = common.parser("sm_rate", __doc__)
    p.add_argument("--ctas", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 132],
                   help="CTA counts to time (grid sizes)")
    p.add_argument("--mib", type=int, default=1024, help="size of the copied buffer in MiB (read once, written once)")
    p.add_argument("--iters", type=int, default=10, help="timed calls per CTA count per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before each CTA count's timed ones")
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds over the CTA counts")
    p.add_argument("--shared-ctas", action="store_true",
                   help="do not force one CTA per SM (the block scheduler may then put several CTAs on one SM)")
    common.add_run_flags(p, tp=False)
    return p.parse_args(argv)


def rates(nbytes: int, ms: float, ctas: int, num_sms: int) -> dict:
    """The derived columns of one row: SMs occupied, GB/s, GB/s per SM."""
    sms = min(ctas, num_sms)
    gbps = nbytes / (ms * 1e-3) / 1e9
    return {"sms": sms, "gbps": gbps, "gbps_per_sm": gbps / sms}


def one_per_sm_smem(attrs: dict) -> int:
    """Dynamic shared memory per CTA that leaves room for only one CTA per SM (more than half the SM's)."""
    per_sm = int(attrs["MaxSharedMemoryPerMultiprocessor"])
    per_block = int(attrs["MaxSharedMemoryPerBlockOptin"])
    return min(per_block, per_sm // 2 + 1024)


def main(argv=None) -> int:
    args = parse_args(argv)
    bad = [k for k in args.ctas if k < 1]
    if bad or args.mib < 1 or args.iters < 1 or args.rounds < 1 or args.warmup < 0:
        raise dist.UsageError(f"--ctas values, --mib, --iters and --rounds must be >= 1 and --warmup >= 0 "
                              f"(got ctas {args.ctas})")
    world = common.init(args, gpu_only="it times a CUDA copy kernel")
    import cupy as cp
    attrs = cp.cuda.Device().attributes
    num_sms = int(attrs["MultiProcessorCount"])
    smem = 0 if args.shared_ctas else one_per_sm_smem(attrs)

    nbytes = args.mib * 2**20
    n = nbytes // 16                                      # 16-byte vectors
    src = cp.random.randint(0, 2**31 - 1, size=nbytes // 4, dtype=cp.int32)  # [n * 4] random words
    dst = cp.zeros_like(src)
    fn = kernels.function("copy_rate", "copy16")
    stream = cp.cuda.Stream(non_blocking=True)
    cp.cuda.Device().synchronize()

    def copy(k: int):
        kernels.launch(fn, k, THREADS, (src, dst, np.uint64(n)), shared_mem=smem, stream=stream)

    writer = common.writer(args, world, "sm_rate", threads=THREADS)
    samples = bench.round_robin(args.ctas, lambda k: bench.time_gpu(lambda: copy(k), args.iters, args.warmup, stream),
                                args.rounds)

    print(f"{world.gpu_name}, {num_sms} SMs, {args.mib} MiB copied ({2 * args.mib} MiB moved per call), "
          f"{'one CTA per SM' if smem else 'CTAs packed by the scheduler'}")
    print(f"{'ctas':>5} {'sms':>4} {'ms':>9} {'GB/s':>9} {'GB/s/SM':>8} {'ok':>3}")
    all_correct = True
    for k in args.ctas:
        with stream:
            dst.fill(0)
        copy(k)
        stream.synchronize()
        correct = bool(cp.array_equal(src, dst))
        all_correct &= correct
        t = np.asarray(samples[k])
        ms = float(np.median(t))
        row = {"ctas": k, "bytes": 2 * nbytes, "ms": ms, "min_ms": float(t.min()), "max_ms": float(t.max()),
               **rates(2 * nbytes, ms, k, num_sms), "one_per_sm": bool(smem), "smem_bytes": smem,
               "num_sms": num_sms, "correct": correct}
        writer.write(row)
        print(f"{k:>5} {row['sms']:>4} {ms:>9.3f} {row['gbps']:>9.1f} {row['gbps_per_sm']:>8.1f} "
              f"{'ok' if correct else 'BAD':>3}")
    print(f"wrote {writer.path}")
    return 0 if all_correct else 1


if __name__ == "__main__":
    dist.shutdown(main())
