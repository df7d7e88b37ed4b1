"""The one timing utility.

GPU: a CUDA event pair around every iteration on the given stream, after `warmup` untimed calls;
the per-iteration times are returned so callers can report median, min and max. CPU: perf_counter
around each call (correctness runs only; CPU timings mean nothing for GPUs).

One rule for every experiment (`round_robin` + `summarize`): configurations are timed in rounds, each
round measuring every configuration once, in an order rotated by one each round, so slow drifts of
the machine (clocks, temperature) hit every configuration alike instead of favouring the ones measured
first; a configuration's number is the median of all its samples over all rounds on each rank, and
the slowest rank's median is reported (a TP step is as slow as its slowest GPU).
"""
from __future__ import annotations

import time

import numpy as np


def time_gpu(fn, iters: int = 20, warmup: int = 5, stream=None) -> np.ndarray:
    """Milliseconds of each of `iters` calls of fn() (which launches on `stream`)."""
    import cupy as cp
    stream = stream or cp.cuda.get_current_stream()
    for _ in range(warmup):
        fn()
    events = [(cp.cuda.Event(), cp.cuda.Event()) for _ in range(iters)]
    for start, end in events:
        start.record(stream)
        fn()
        end.record(stream)
    stream.synchronize()
    return np.array([cp.cuda.get_elapsed_time(s, e) for s, e in events])


def hold(stream, us: float = 1000.0) -> None:
    """Keep `stream` busy for `us` microseconds (cuda/hold.cu) so the launches that follow are queued
    before the GPU reaches them: an event recorded after the hold then times GPU work, not host gaps."""
    from tw.runtime import kernels
    kernels.launch(kernels.function("hold", "hold"), 1, 1, (np.uint64(int(us * 1e3)),), stream=stream)


def hold_sms(stream, k: int, us: float, cluster: int = 1) -> None:
    """Occupy k SMs for `us` microseconds: k CTAs of the hold kernel, each with all the shared memory a
    CTA may have, so no other CTA (a cuBLAS GEMM's needs ~100-230 KiB) fits beside it on its SM. What a
    comm kernel of k CTAs takes from the GEMMs beside it, with no memory traffic of its own.
    cluster=2: as k/2 clusters of 2 CTAs (k even), i.e. SMs taken in pairs within a GPC."""
    if cluster not in (1, 2) or k % cluster:
        raise ValueError(f"hold_sms: cluster must be 1 or 2 and divide k, got cluster={cluster}, k={k}")
    import cupy as cp
    from tw.runtime import kernels
    smem = int(cp.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"])
    kernels.launch(kernels.function("hold", "hold" if cluster == 1 else "hold_pair"), k, 32,
                   (np.uint64(int(us * 1e3)),), shared_mem=smem, stream=stream)


def time_cpu(fn, iters: int = 3, warmup: int = 1) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return np.array(out)


def summarize(times_ms: np.ndarray, comm=None) -> dict:
    """median/min/max in ms; with an MPI comm, each is the maximum over its ranks (slowest rank)."""
    stats = np.array([np.median(times_ms), np.min(times_ms), np.max(times_ms)], dtype=np.float64)
    if comm is not None and comm.Get_size() > 1:
        from mpi4py import MPI
        comm.Allreduce(MPI.IN_PLACE, stats, op=MPI.MAX)
    return {"median_ms": float(stats[0]), "min_ms": float(stats[1]), "max_ms": float(stats[2])}


def passes(fn, world, stream=None, iters: int = 20, warmup: int = 5) -> np.ndarray:
    """ms of each of `iters` calls of fn() after `warmup`: CUDA events on the GPU, perf_counter on the
    CPU (where callers pass small counts: correctness runs only)."""
    if world.is_gpu:
        return time_gpu(fn, iters, warmup, stream)
    return time_cpu(fn, iters, warmup)


def round_robin(configs, measure, rounds: int) -> dict:
    """{config: all samples} from `rounds` rounds; round r measures every config once, starting at
    config r mod n (rotated order). measure(config) returns an array of samples (ms), 1-D, or 2-D
    [samples, k] for k quantities measured together; samples of all rounds are concatenated."""
    configs = list(configs)
    if rounds < 1:
        raise ValueError(f"round_robin needs >= 1 round, got {rounds}")
    samples = {c: [] for c in configs}
    for r in range(rounds):
        for j in range(len(configs)):
            c = configs[(r + j) % len(configs)]
            samples[c].append(np.asarray(measure(c), dtype=np.float64))
    return {c: np.concatenate(s) for c, s in samples.items()}


def slowest_median(samples, comm=None) -> float:
    """The one median rule: median of this rank's samples, then the maximum over `comm`'s ranks."""
    return summarize(np.asarray(samples), comm)["median_ms"]


def timed(fns: dict, world, stream=None, iters: int = 20, warmup: int = 5, rounds: int = 3) -> dict:
    """{name: summarize(...)} of each callable in `fns` timed round-robin (`passes` per round)."""
    samples = round_robin(fns, lambda name: passes(fns[name], world, stream, iters, warmup), rounds)
    return {name: summarize(s, world.comm) for name, s in samples.items()}
