"""GPU tests of the P2P transport, run with 2 (or more) MPI ranks:

    mpirun -n 2 python -m tests.mpi_p2p [--quick]

Communication is checked exactly with rank-and-row-encoded integers (exact in bf16, sums exact);
the fused AllReduce + add + RMSNorm against a float64 NumPy reference with fresh random data.
Tolerance for the fused result: relative norm error <= 1e-2. Why: inputs are exact bf16 values and
the kernel accumulates in fp32, so the only sizeable error is the final rounding of y (and of the
stored residual, and of the sum in the replicated order) to bf16, whose unit roundoff is 2^-9 ~ 2e-3
(relative RMS ~1e-3); 1e-2 leaves a 5-10x margin while any indexing or race bug gives O(1).
Every rank reports its failures; rank 0 prints "P2P TESTS PASSED" only when no rank failed.
"""
from __future__ import annotations

import argparse
import hashlib
import sys

import ml_dtypes
import numpy as np

from tests.mpi_checks import FAILS, expect, expect_user_errors, rel_err, report, section as run_section
from tw.runtime import dist
from tw.runtime.graph import Graph
from tw.comm import owned_rows
from tw.comm.p2p import P2PComm, P2PTimeout, options_from_env

# The kernels' build options (TW_P2P_CLUSTER=2 tests the 2-CTA cluster build), read once and passed to every
# P2PComm here, as an experiment passes its run's.
BUILD = options_from_env()

BF16 = ml_dtypes.bfloat16


def to_dev(x):
    import cupy as cp
    return cp.asarray(np.ascontiguousarray(x).astype(BF16).view(np.uint16)).view(cp.dtype("bfloat16"))


def to_host(d):
    import cupy as cp
    return d.view(cp.uint16).get().view(BF16)


def encoded(rank: int, rows: int, hidden: int, tp: int) -> np.ndarray:
    """Value = rank*a + (row % R)*C + (col % C), sign flipped on odd col blocks of 8, with a = R*C the
    largest power of 2 <= 256 / tp^2 (tp=2: a=64, R=C=8; tp=4: 16; tp=8: 4). Every value is an integer
    below 256/tp and every sum over the tp ranks one below 256: exact in bf16 (8 significant bits)."""
    a = 1 << int(np.floor(np.log2(256 / tp ** 2)))
    c = 1 << (int(np.log2(a)) // 2)
    i = (np.arange(rows) % (a // c))[:, None]
    j = np.arange(hidden)[None, :]
    v = rank * a + i * c + (j % c)
    return (v * np.where((j // 8) % 2 == 1, -1, 1)).astype(np.float32)


def partials(seed: int, tp: int, rows: int, hidden: int) -> list[np.ndarray]:
    """Every rank's partial rows, the same on every rank (so each can build the reference)."""
    return [np.random.default_rng(seed * 100 + r).standard_normal((rows, hidden)).astype(BF16) for r in range(tp)]


def reference(parts, residual, weight, eps, rounded_sum=False):
    s = sum(p.astype(np.float64) for p in parts)
    if rounded_sum:
        s = s.astype(np.float32).astype(BF16).astype(np.float64)
    h = s + residual.astype(np.float64)
    y = h / np.sqrt(np.mean(h * h, axis=1, keepdims=True) + eps) * weight.astype(np.float64)
    return h, y


def budget(comm, ctas: int) -> int:
    """A case's CTA count as this build launches it: rounded up to a multiple of the kernels' cluster
    size (TW_P2P_CLUSTER=2 runs every case with even budgets; 1 leaves them as written)."""
    return ctas + (-ctas) % comm.cluster


# --------------------------------------------------------------------------------------------- tests
def test_exact_collectives(world, comm, hidden, cases):
    import cupy as cp
    me, tp = world.tp_rank, world.tp_size
    stage = comm.staging(comm.max_tokens)
    n = comm.max_tokens
    enc = [encoded(r, n, hidden, tp) for r in range(tp)]
    total = sum(enc)
    base = enc[me]
    for start, end, ctas, oneshot in cases:
        ctas = budget(comm, ctas)
        for op in ("all_reduce", "reduce_scatter", "all_gather"):
            stage[...] = to_dev(base)
            if op == "all_reduce":
                comm.all_reduce(start, end, ctas=ctas, oneshot=oneshot)
            else:
                getattr(comm, op)(start, end, ctas=ctas)
            got = to_host(stage).astype(np.float32)
            comm.check()
            exp = base.copy()
            if op == "all_reduce":
                exp[start:end] = total[start:end]
            elif op == "reduce_scatter":
                lo, hi = owned_rows(start, end, me, tp)
                exp[lo:hi] = total[lo:hi]
            else:
                for q in range(tp):
                    lo, hi = owned_rows(start, end, q, tp)
                    exp[lo:hi] = enc[q][lo:hi]
            bad = np.argwhere(got != exp)
            expect(bad.size == 0, f"{op} H={hidden} [{start},{end}) ctas={ctas} oneshot={oneshot}: "
                                  f"{len(bad)} wrong values, first at (row, col) {bad[:3].tolist()}")
    cp.cuda.Device().synchronize()


def run_fused(world, comm, start, end, ctas, seed, *, out_kind="private", sharded=True, oneshot=None,
              sync_all=False, eps=1e-5, check=True, stream=None):
    """One fused call with fresh random data; compares out (every row) and residual (owned rows)."""
    import cupy as cp
    ctas = budget(comm, ctas)
    me, tp, H, n = world.tp_rank, world.tp_size, comm.hidden, end - start
    parts = partials(seed, tp, n, H)
    rng = np.random.default_rng(seed + 7)
    res0 = rng.standard_normal((n, H)).astype(BF16)
    weight = (1.0 + 0.1 * rng.standard_normal(H)).astype(BF16)
    M = comm.max_tokens
    residual = cp.zeros((M, H), dtype=cp.dtype("bfloat16"))
    residual[start:end] = to_dev(res0)
    out = {"private": lambda: cp.full((M, H), 7, dtype=cp.dtype("bfloat16")),
           "registered": lambda: comm.output(M), "staging": lambda: comm.staging(M)}[out_kind]()
    if out_kind == "registered":
        out[...] = 7
    comm.staging(M)[start:end] = to_dev(parts[me])
    w = to_dev(weight)
    comm.ar_add_norm(start, end, residual, w, eps, out, stream=stream, sharded=sharded, ctas=ctas,
                     oneshot=oneshot, sync_all=sync_all)
    comm.check()
    if not check:
        return
    tag = (f"fused H={H} [{start},{end}) ctas={ctas} out={out_kind} sharded={sharded} oneshot={oneshot} "
           f"sync_all={sync_all} rank={me}")
    h, y = reference(parts, res0, weight, eps, rounded_sum=not sharded and n > comm.oneshot_max_tokens)
    got = to_host(out)
    rel_err(got[start:end].astype(np.float64), y, tag + " out")
    if out_kind == "private":
        outside = np.concatenate([got[:start], got[end:]]).astype(np.float32)
        expect(np.all(outside == 7), tag + ": out rows outside [start, end) were modified")
    lo, hi = owned_rows(start, end, me, tp) if sharded else (start, end)
    res = to_host(residual)
    rel_err(res[lo:hi].astype(np.float64), h[lo - start:hi - start], tag + " residual")
    # Bit-identical outputs on every rank.
    digest = hashlib.sha256(got[start:end].view(np.uint16).tobytes()).hexdigest()  # hash() is salted per process
    digests = world.tp_comm.allgather(digest)
    expect(len(set(digests)) == 1, tag + ": out differs between ranks")


def test_stress(world, comm, num_calls, seed):
    """Back-to-back calls with random ops, ranges and CTA counts (the same sequence on every rank),
    refilling the staging rows from a device copy each call; every 25th call is checked."""
    import cupy as cp
    me, tp, H, M = world.tp_rank, world.tp_size, comm.hidden, comm.max_tokens
    rng = np.random.default_rng(seed)  # shared seed: identical op sequence on every rank
    src_all = [np.random.default_rng(1000 + r).standard_normal((M, H)).astype(BF16) for r in range(tp)]
    src = to_dev(src_all[me])
    res0 = np.random.default_rng(999).standard_normal((M, H)).astype(BF16)
    res0_d = to_dev(res0)
    residual = res0_d.copy()
    weight = (1.0 + 0.1 * np.random.default_rng(998).standard_normal(H)).astype(BF16)
    w = to_dev(weight)
    out = cp.empty((M, H), dtype=cp.dtype("bfloat16"))
    stage = comm.staging(M)
    checked = 0
    for i in range(num_calls):
        n = int(rng.integers(1, M + 1)) if rng.random() < 0.7 else int(rng.integers(1, 300))
        start = int(rng.integers(0, M - n + 1))
        ctas = budget(comm, int(rng.choice([1, 2, 3, 4, 8, 16, 32, 64, 132])))
        op = rng.choice(["fused", "fused", "all_reduce", "fused_out_reg"])
        stage[start:start + n] = src[start:start + n]
        check = i % 25 == 24
        if check:
            residual[start:start + n] = res0_d[start:start + n]
        if op == "all_reduce":
            comm.all_reduce(start, start + n, ctas=ctas)
        else:
            o = comm.output(M) if op == "fused_out_reg" else out
            comm.ar_add_norm(start, start + n, residual, w, 1e-5, o, ctas=ctas)
        if not check:
            continue
        checked += 1
        comm.check()
        parts = [s[start:start + n] for s in src_all]
        tag = f"stress call {i} op={op} [{start},{start + n}) ctas={ctas}"
        if op == "all_reduce":
            acc = parts[0].astype(np.float32)
            for p in parts[1:]:      # the kernel's order: ((p0 + p1) + p2) + ... in fp32, then bf16
                acc += p.astype(np.float32)
            exp = acc.astype(BF16)
            got = to_host(stage[start:start + n])
            nbad = int(np.sum(got.view(np.uint16) != exp.view(np.uint16)))
            expect(nbad == 0, f"{tag}: {nbad} values differ from the bf16-rounded fp32 sum")
        else:
            h, y = reference(parts, res0[start:start + n], weight, 1e-5)
            o = comm.output(M) if op == "fused_out_reg" else out
            rel_err(to_host(o[start:start + n]).astype(np.float64), y, tag + " out")
            lo, hi = owned_rows(start, start + n, me, tp)
            rel_err(to_host(residual[lo:hi]).astype(np.float64), h[lo - start:hi - start], tag + " residual")
    comm.check()
    return checked


def test_graph(world, comm, start, end, ctas, replays=5):
    """Capture one fused call in a CUDA graph; replay it on fresh data written between replays."""
    import cupy as cp
    ctas = budget(comm, ctas)
    me, tp, H, M = world.tp_rank, world.tp_size, comm.hidden, comm.max_tokens
    n = end - start
    stream = cp.cuda.Stream(non_blocking=True)
    weight = (1.0 + 0.1 * np.random.default_rng(5).standard_normal(H)).astype(BF16)
    w = to_dev(weight)
    residual = cp.zeros((M, H), dtype=cp.dtype("bfloat16"))
    out = cp.zeros((M, H), dtype=cp.dtype("bfloat16"))
    stage = comm.staging(M)
    g = Graph(lambda: comm.ar_add_norm(start, end, residual, w, 1e-5, out, stream=stream, ctas=ctas), stream)
    for k in range(replays):
        parts = partials(50 + k, tp, n, H)
        res0 = np.random.default_rng(60 + k).standard_normal((n, H)).astype(BF16)
        with stream:
            stage[start:end] = to_dev(parts[me])
            residual[start:end] = to_dev(res0)
        g()
        stream.synchronize()
        comm.check()
        h, y = reference(parts, res0, weight, 1e-5)
        rel_err(to_host(out[start:end]).astype(np.float64), y, f"graph replay {k} [{start},{end}) ctas={ctas} out")
        lo, hi = owned_rows(start, end, me, tp)
        rel_err(to_host(residual[lo:hi]).astype(np.float64), h[lo - start:hi - start], f"graph replay {k} residual")


def test_bad_input(world, comm):
    import cupy as cp
    M, H = comm.max_tokens, comm.hidden
    bf = cp.dtype("bfloat16")
    res = cp.zeros((M, H), dtype=bf)
    out = cp.zeros((M, H), dtype=bf)
    w = cp.ones(H, dtype=bf)
    flat = cp.zeros(M * H + 8, dtype=bf)
    wide = cp.zeros((M, 2 * H), dtype=bf)
    cases = {
        "end > max_tokens": lambda: comm.all_reduce(0, M + 1),
        "start > end": lambda: comm.ar_add_norm(5, 4, res, w, 1e-5, out),
        "negative start": lambda: comm.reduce_scatter(-1, 4),
        "float32 residual": lambda: comm.ar_add_norm(0, 4, res.astype(cp.float32), w, 1e-5, out),
        "non-contiguous out": lambda: comm.ar_add_norm(0, 4, res, w, 1e-5, wide[:, :H]),
        "misaligned out": lambda: comm.ar_add_norm(0, 4, res, w, 1e-5, flat[1:1 + M * H].reshape(M, H)),
        "short residual": lambda: comm.ar_add_norm(0, 4, res[:3], w, 1e-5, out),
        "weight shape": lambda: comm.ar_add_norm(0, 4, res, w[:8], 1e-5, out),
        "float32 weight": lambda: comm.ar_add_norm(0, 4, res, w.astype(cp.float32), 1e-5, out),
        "ctas 0": lambda: comm.all_reduce(0, 4, ctas=0),
        "ctas > SMs": lambda: comm.all_reduce(0, 4, ctas=100000),
        "out inside staging, not at row 0": lambda: comm.ar_add_norm(0, 4, res, w, 1e-5, comm.staging(M)[1:]),
        "oneshot too large": lambda: comm.all_reduce(0, comm.oneshot_max_tokens + 1, oneshot=True),
        "hidden % 8": lambda: P2PComm(world, H - 4, 16),
        "dtype": lambda: P2PComm(world, H, 16, dtype="float16"),
    }
    if comm.cluster > 1:
        cases["ctas not a multiple of the cluster"] = lambda: comm.all_reduce(0, 4, ctas=comm.cluster + 1)
    expect_user_errors(cases)
    comm.check()  # nothing was launched, nothing hung


def test_timeout(world, hidden):
    """Rank 0 calls, the others do not: rank 0's kernel gives up after timeout_s and check() raises."""
    comm = P2PComm(world, hidden, 64, timeout_s=1.0, **BUILD)
    if world.tp_rank == 0:
        comm.all_reduce(0, 64)
        try:
            comm.check()
        except P2PTimeout as e:
            expect("rank 1 did not arrive within 1 s" in str(e), f"timeout message unexpected: {e}")
        else:
            FAILS.append("timeout: rank 0 alone did not raise P2PTimeout")
    world.tp_comm.Barrier()
    return comm


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer cases and 200 stress calls")
    ap.add_argument("--stress-calls", type=int, default=1000)
    args = ap.parse_args()
    world = dist.init(device="gpu")
    import cupy as cp
    say = world.print0
    tp = world.tp_size
    say(f"P2P tests on {tp} ranks, GPU {cp.cuda.runtime.getDeviceProperties(0)['name']}"
        + (f", {BUILD['cluster']}-CTA clusters (TW_P2P_CLUSTER)" if BUILD["cluster"] > 1 else ""))
    keep = []

    def section(name, fn, *a, **k):
        return run_section(world, name, fn, *a, **k)

    hiddens = (8192,) if args.quick else (5120, 6144, 8192)
    for H in hiddens:
        comm = P2PComm(world, H, 4608, **BUILD)
        keep.append(comm)
        ex_cases = [(0, 1, 1, None), (3, 40, 3, None), (3, 40, 3, False), (100, 1101, 8, False),
                    (100, 1101, 132, None), (7, 7 + 4099, 16, None), (0, 4608, 8, None), (17, 17 + 255, 5, True)]
        section(f"exact AR/RS/AG H={H}", test_exact_collectives, world, comm, H,
                ex_cases[:4] if args.quick else ex_cases)
        fcases = [(0, 1, 1, {}), (3, 40, 3, {}), (3, 40, 3, dict(oneshot=False)),
                  (5, 5 + 256, 8, {}), (5, 5 + 257, 8, {}), (100, 1101, 8, {}), (100, 1101, 7, dict(out_kind="registered")),
                  (100, 1101, 8, dict(out_kind="staging")), (33, 33 + 2047, 132, {}), (1, 1 + 4099, 16, {}),
                  (0, 4608, 8, dict(out_kind="registered")), (11, 11 + 999, 8, dict(sharded=False)),
                  (11, 11 + 99, 4, dict(sharded=False)), (50, 50 + 3001, 8, dict(sync_all=True)),
                  (50, 50 + 3001, 2, dict(out_kind="registered", sync_all=True)), (9, 9 + 200, 32, dict(out_kind="registered"))]
        if args.quick:
            fcases = fcases[::2]
        elif H != 8192:  # the other widths: the small, odd and mode cases (the big ones cost minutes)
            fcases = [f for f in fcases if f[1] - f[0] <= 1001]
        for k, (s, e, c, kw) in enumerate(fcases):
            section(f"fused H={H} [{s},{e}) ctas={c} {kw}", run_fused, world, comm, s, e, c, 10 * H + k, **kw)
    # The pulled fused kernel (p2p_ar_norm_pull, two-shot only): the same cases' shapes and a stress run that
    # mixes it with the pushed all-reduce on the same buffers (its reuse argument, cuda/ar_norm_p2p.cu).
    pull = P2PComm(world, hiddens[-1], 4608, pull=True, oneshot_max_tokens=0, **BUILD)
    keep.append(pull)
    pcases = [(3, 40, 3, {}), (100, 1101, 8, {}), (100, 1101, 7, dict(out_kind="registered")),
              (100, 1101, 8, dict(out_kind="staging")), (1, 1 + 4099, 16, {}), (0, 4608, 8, dict(out_kind="registered")),
              (50, 50 + 3001, 2, dict(out_kind="registered", sync_all=True))]
    for k, (s, e, c, kw) in enumerate(pcases[::2] if args.quick else pcases):
        section(f"fused (pull) H={pull.hidden} [{s},{e}) ctas={c} {kw}", run_fused, world, pull, s, e, c, 77 * k + 5, **kw)
    n = section("stress (pull) 200 calls", test_stress, world, pull, 200, 4343)
    say(f"    ({n} calls checked against the reference)")
    comm = keep[-2]
    n = section(f"stress {args.stress_calls if not args.quick else 200} calls H={comm.hidden}", test_stress,
                world, comm, 200 if args.quick else args.stress_calls, 4242)
    say(f"    ({n} calls checked against the reference)")
    section("CUDA graph replay (two-shot)", test_graph, world, comm, 300, 300 + 3000, 8)
    section("CUDA graph replay (one-shot)", test_graph, world, comm, 40, 40 + 64, 16)
    section("bad input raises", test_bad_input, world, comm)
    keep.append(section("timeout raises", test_timeout, world, comm.hidden))

    sys.exit(report(world, "P2P"))


if __name__ == "__main__":
    main()
