"""The one timing utility.

GPU: a CUDA event pair around every iteration on the given stream, after `warmup` untimed calls;
the per-iteration times are returned so callers can report median, min and max. Across ranks the
reported number is the slowest rank's median (a TP step is as slow as its slowest GPU).
CPU: perf_counter around each call (correctness runs only; CPU timings mean nothing for GPUs).
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
    from . import kernels
    kernels.launch(kernels.function("hold", "hold"), 1, 1, (np.uint64(int(us * 1e3)),), stream=stream)


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


def median_ms(fn, world, stream=None, iters: int = 20, warmup: int = 5) -> float:
    """The slowest rank's median time of fn(): a CUDA graph of it replayed under events on the GPU,
    perf_counter on the CPU (a couple of calls: correctness runs only)."""
    if world.is_gpu:
        from .graph import Graph
        return summarize(time_gpu(Graph(fn, stream), iters, warmup, stream), world.comm)["median_ms"]
    return summarize(time_cpu(fn, 2, 1), world.comm)["median_ms"]
