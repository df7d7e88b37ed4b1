"""GPU tests of the copy-engine transport (tw/comm/ce.py), run with 2 (or more) MPI ranks:

    TW_SHARE_GPU=1 mpirun -n 2 python -m tests.mpi_ce      # two ranks on one GPU
    mpirun -n 2 python -m tests.mpi_ce                      # one GPU per rank

1. exact: rank-encoded data v = (3 row + col + 5 r) mod 8 (as tests/mpi_model.py check_comm_exact) through
   all_reduce and ar_add_norm: every sum (<= 7 tp + 3) is an integer, exact in bf16, so the reduced rows and
   the owned residual rows must match exactly, in every row range (n < tp, unaligned starts, n not divisible
   by tp or by the chunk count), with several CTA counts and chunk counts;
2. the fused result on fresh random data against a float64 reference (relative norm error <= 1e-2, the
   tolerance tests/mpi_p2p.py derives), out private / registered / staging, bit-identical on every rank;
3. bit-identical to P2PComm (two-shot) on the same inputs, where P2PComm can be built;
4. back-to-back calls on the same rows and alternating halves, no host sync between them (buffer reuse);
5. a CUDA graph of one call (tw.runtime.graph.Graph) replayed 5 times on fresh data;
6. bad inputs raise ValueError / TypeError; make("ce") builds a CeComm;
7. last, a dead peer: ranks 1.. skip a call; rank 0's check() must raise CeTimeout within timeout_s. Then
   the late ranks make the call after all, which must release rank 0's blocked stream with correct results.
Every rank reports its failures; rank 0 prints "CE TESTS PASSED" only when no rank failed.

The job ends through dist.shutdown: MPI_Finalize, then os._exit without Python's finalizers. That is the
GPU convention of tw.dist anyway, and it matters here: if test 7 left rank 0's stream blocked in a stream
wait (the late call not releasing it), interpreter teardown would free IPC mappings, streams and buffers
that the blocked work still uses and could hang; os._exit leaves it to the driver.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from tests.mpi_checks import (FAILS, expect, expect_user_errors, rel_err, report, same_on_all_ranks,
                              section as run_section)
from tests.mpi_p2p import BF16, partials, reference, to_dev, to_host
from tw import comm as transports
from tw.runtime import dist
from tw.comm import owned_rows
from tw.comm.ce import CeComm, CeTimeout
from tw.runtime.graph import Graph

EPS = 1e-5


def bf16_zeros(shape, fill=0.0):
    import cupy as cp
    return cp.full(shape, fill, dtype=cp.dtype("bfloat16"))


def random_inputs(seed, tp, n, H):
    rng = np.random.default_rng(seed + 7)
    return (partials(seed, tp, n, H), rng.standard_normal((n, H)).astype(BF16),
            (1.0 + 0.1 * rng.standard_normal(H)).astype(BF16))


# --------------------------------------------------------------------------------------------- tests
def test_exact(world, comm, cases):
    """Rank-encoded integers: all_reduce rows and owned residual rows exact, out close and rank-identical."""
    import cupy as cp
    me, tp, M, H = world.tp_rank, world.tp_size, comm.max_tokens, comm.hidden
    rows, cols = np.arange(M)[:, None], np.arange(H)[None, :]
    enc = [((3 * rows + cols + 5 * r) % 8).astype(np.float32) for r in range(tp)]
    total = sum(e.astype(np.float64) for e in enc)
    stage, w = comm.staging(M), cp.ones(H, dtype=cp.dtype("bfloat16"))
    for start, end, ctas in cases:
        tag = f"exact H={H} chunks={comm.chunks} [{start},{end}) ctas={ctas} rank={me}"
        stage[...] = to_dev(enc[me])
        comm.all_reduce(start, end, ctas=ctas)
        comm.check()
        got, exp = to_host(stage).astype(np.float64), enc[me].astype(np.float64)
        exp[start:end] = total[start:end]
        bad = np.argwhere(got != exp)
        expect(bad.size == 0, f"{tag} all_reduce: {len(bad)} wrong values, first at (row, col) {bad[:3].tolist()}")

        stage[...] = to_dev(enc[me])
        residual, out = bf16_zeros((M, H), 3.0), bf16_zeros((M, H), 7.0)
        comm.ar_add_norm(start, end, residual, w, EPS, out, ctas=ctas)
        comm.check()
        lo, hi = owned_rows(start, end, me, tp)
        res = to_host(residual).astype(np.float64)
        exp = np.full((M, H), 3.0)
        exp[lo:hi] += total[lo:hi]
        bad = np.argwhere(res != exp)
        expect(bad.size == 0, f"{tag} residual: {len(bad)} wrong values, first at {bad[:3].tolist()}")
        h = total[start:end] + 3.0
        y = h / np.sqrt(np.mean(h * h, axis=1, keepdims=True) + EPS)
        o = to_host(out)
        rel_err(o[start:end], y, tag + " out")
        expect(np.all(np.concatenate([o[:start], o[end:]]).astype(np.float32) == 7), tag + ": out rows outside changed")
        same_on_all_ranks(world, o[start:end].view(np.uint16), tag + " out")


def run_fused(world, comm, start, end, ctas, seed, out_kind="private", stream=None):
    """One fused call with fresh random data, against the float64 reference; returns (out, owned residual)."""
    import cupy as cp
    me, tp, H, M, n = world.tp_rank, world.tp_size, comm.hidden, comm.max_tokens, end - start
    parts, res0, weight = random_inputs(seed, tp, n, H)
    residual = bf16_zeros((M, H))
    residual[start:end] = to_dev(res0)
    out = {"private": lambda: bf16_zeros((M, H), 7.0), "registered": lambda: comm.output(M),
           "staging": lambda: comm.staging(M)}[out_kind]()
    comm.staging(M)[start:end] = to_dev(parts[me])
    w = to_dev(weight)
    cp.cuda.get_current_stream().synchronize()  # the inputs are written before a call on another stream
    comm.ar_add_norm(start, end, residual, w, EPS, out, stream=stream, ctas=ctas)
    comm.check()
    tag = f"fused H={H} chunks={comm.chunks} [{start},{end}) ctas={ctas} out={out_kind} rank={me}"
    h, y = reference(parts, res0, weight, EPS)
    got = to_host(out)
    rel_err(got[start:end], y, tag + " out")
    if out_kind == "private":
        expect(np.all(np.concatenate([got[:start], got[end:]]).astype(np.float32) == 7), tag + ": rows outside changed")
    lo, hi = owned_rows(start, end, me, tp)
    res = to_host(residual)
    rel_err(res[lo:hi], h[lo - start:hi - start], tag + " residual")
    same_on_all_ranks(world, got[start:end].view(np.uint16), tag + " out")
    return got[start:end].copy(), res[lo:hi].copy()


def test_same_as_p2p(world, comm, p2p, cases):
    """Bit-identical out and residual rows (and all_reduce rows) to the P2P transport's two-shot kernels."""
    import cupy as cp
    me, tp, H, M = world.tp_rank, world.tp_size, comm.hidden, comm.max_tokens
    for k, (start, end, ctas) in enumerate(cases):
        parts, res0, weight = random_inputs(500 + k, tp, end - start, H)
        lo, hi = owned_rows(start, end, me, tp)
        bits = []
        for c in (comm, p2p):
            residual, out = bf16_zeros((M, H)), bf16_zeros((M, H))
            residual[start:end] = to_dev(res0)
            c.staging(M)[start:end] = to_dev(parts[me])
            kw = {"oneshot": False} if c is p2p else {}
            c.ar_add_norm(start, end, residual, to_dev(weight), EPS, out, ctas=ctas, **kw)
            c.check()
            c.staging(M)[start:end] = to_dev(parts[me])
            c.all_reduce(start, end, ctas=ctas, **kw)
            c.check()
            cp.cuda.Device().synchronize()
            bits.append([to_host(out[start:end]).view(np.uint16), to_host(residual[lo:hi]).view(np.uint16),
                         to_host(c.staging(M)[start:end]).view(np.uint16)])
        for i, what in enumerate(("out", "owned residual", "all_reduce")):
            nbad = int(np.sum(bits[0][i] != bits[1][i]))
            expect(nbad == 0, f"vs p2p H={H} [{start},{end}) ctas={ctas} rank={me}: {what} differs in {nbad} values")


def test_back_to_back(world, comm, ranges, calls):
    """`calls` fused calls cycling through `ranges` (the same rows again, or alternating halves), each on
    fresh data written on the stream just before it, results copied out after it, no host sync between."""
    import cupy as cp
    me, tp, H, M = world.tp_rank, world.tp_size, comm.hidden, comm.max_tokens
    stream = cp.cuda.Stream(non_blocking=True)
    inputs, results = [], []
    residual = bf16_zeros((M, H))
    outs = [comm.output(M), bf16_zeros((M, H))]  # registered and private out, alternating
    cp.cuda.Device().synchronize()  # the arrays above were filled on the null stream
    with stream:
        for i in range(calls):
            start, end = ranges[i % len(ranges)]
            parts, res0, weight = random_inputs(700 + i, tp, end - start, H)
            inputs.append((start, end, parts, res0, weight))
            src, r0, w = to_dev(parts[me]), to_dev(res0), to_dev(weight)
            comm.staging(M)[start:end] = src
            residual[start:end] = r0
            out = outs[i % 2]
            comm.ar_add_norm(start, end, residual, w, EPS, out, stream=stream)
            lo, hi = owned_rows(start, end, me, tp)
            results.append((out[start:end].copy(), residual[lo:hi].copy()))
    stream.synchronize()
    comm.check()
    for i, ((start, end, parts, res0, weight), (o, r)) in enumerate(zip(inputs, results)):
        h, y = reference(parts, res0, weight, EPS)
        lo, hi = owned_rows(start, end, me, tp)
        tag = f"back-to-back call {i} [{start},{end}) rank={me}"
        rel_err(to_host(o), y, tag + " out")
        rel_err(to_host(r), h[lo - start:hi - start], tag + " residual")


def test_graph(world, comm, start, end, ctas, out_kind, replays=5):
    """One call captured in a CUDA graph, replayed on fresh data written between replays."""
    import cupy as cp
    me, tp, H, M = world.tp_rank, world.tp_size, comm.hidden, comm.max_tokens
    stream = cp.cuda.Stream(non_blocking=True)
    weight = (1.0 + 0.1 * np.random.default_rng(5).standard_normal(H)).astype(BF16)
    w, residual = to_dev(weight), bf16_zeros((M, H))
    out = comm.output(M) if out_kind == "registered" else bf16_zeros((M, H))
    cp.cuda.Device().synchronize()  # the arrays above were filled on the null stream
    g = Graph(lambda: comm.ar_add_norm(start, end, residual, w, EPS, out, stream=stream, ctas=ctas), stream)
    comm.check()
    lo, hi = owned_rows(start, end, me, tp)
    for k in range(replays):
        parts = partials(50 + k, tp, end - start, H)
        res0 = np.random.default_rng(60 + k).standard_normal((end - start, H)).astype(BF16)
        with stream:
            comm.staging(M)[start:end] = to_dev(parts[me])
            residual[start:end] = to_dev(res0)
        g()
        stream.synchronize()
        comm.check()
        h, y = reference(parts, res0, weight, EPS)
        tag = f"graph replay {k} [{start},{end}) ctas={ctas} out={out_kind} rank={me}"
        rel_err(to_host(out[start:end]), y, tag + " out")
        rel_err(to_host(residual[lo:hi]), h[lo - start:hi - start], tag + " residual")
    return g


def test_bad_input(world, comm):
    import cupy as cp
    M, H = comm.max_tokens, comm.hidden
    res, out, w = bf16_zeros((M, H)), bf16_zeros((M, H)), cp.ones(H, dtype=cp.dtype("bfloat16"))
    flat, wide = bf16_zeros((M * H + 8,)), bf16_zeros((M, 2 * H))
    cases = {
        "end > max_tokens": lambda: comm.all_reduce(0, M + 1),
        "start > end": lambda: comm.ar_add_norm(5, 4, res, w, EPS, out),
        "negative start": lambda: comm.all_reduce(-1, 4),
        "float32 residual": lambda: comm.ar_add_norm(0, 4, res.astype(cp.float32), w, EPS, out),
        "non-contiguous out": lambda: comm.ar_add_norm(0, 4, res, w, EPS, wide[:, :H]),
        "misaligned out": lambda: comm.ar_add_norm(0, 4, res, w, EPS, flat[1:1 + M * H].reshape(M, H)),
        "short residual": lambda: comm.ar_add_norm(0, 4, res[:3], w, EPS, out),
        "weight shape": lambda: comm.ar_add_norm(0, 4, res, w[:8], EPS, out),
        "float32 weight": lambda: comm.ar_add_norm(0, 4, res, w.astype(cp.float32), EPS, out),
        "eps 0": lambda: comm.ar_add_norm(0, 4, res, w, 0.0, out),
        "ctas 0": lambda: comm.all_reduce(0, 4, ctas=0),
        "ctas > SMs": lambda: comm.all_reduce(0, 4, ctas=100000),
        "sharded=False call": lambda: comm.ar_add_norm(0, 4, res, w, EPS, out, sharded=False),
        "out inside output, not at row 0": lambda: comm.ar_add_norm(0, 4, res, w, EPS, comm.output(M)[1:]),
        "out inside staging, not at row 0": lambda: comm.ar_add_norm(0, 4, res, w, EPS, comm.staging(M)[1:]),
        "residual in the registered buffers": lambda: comm.ar_add_norm(0, 4, comm.output(M), w, EPS, out),
        "hidden % 8": lambda: CeComm(world, H - 4, 16),
        "dtype": lambda: CeComm(world, H, 16, dtype="float16"),
        "sharded=False": lambda: CeComm(world, H, 16, sharded=False),
        "chunks 0": lambda: CeComm(world, H, 16, chunks=0),
        "ctas > SMs (constructor)": lambda: CeComm(world, H, 16, ctas=world.sm_count + 1),
    }
    expect_user_errors(cases)
    comm.check()  # nothing was launched, nothing hangs


def test_make(world, hidden):
    from tw.ops import BF16 as dtype
    comm = transports.make("ce", world, hidden, 32, dtype, chunks=2, timeout_s=10.0)
    expect(comm.name == "ce" and getattr(comm, "chunks", None) == 2, f"make('ce') gave {comm.name!r}, not a CeComm")
    run_fused(world, comm, 1, 30, 3, 77, out_kind="registered")
    return comm


def test_dead_peer(world, hidden, timeout_s=3.0):
    """Rank 0 makes a call that ranks 1.. skip: its check() raises CeTimeout after ~timeout_s. Then the
    late ranks make that call after all; rank 0's blocked stream must drain, with correct results."""
    import cupy as cp
    me, tp, M = world.tp_rank, world.tp_size, 64
    comm = CeComm(world, hidden, M, timeout_s=timeout_s)
    stream = cp.cuda.Stream(non_blocking=True)
    run_fused(world, comm, 0, M, 4, 90, stream=stream)  # call 1: every rank
    parts, res0, weight = random_inputs(91, tp, M, hidden)
    residual, w = to_dev(res0), to_dev(weight)
    comm.staging(M)[...] = to_dev(parts[me])
    cp.cuda.Device().synchronize()
    world.tp_comm.Barrier()
    if me == 0:
        comm.ar_add_norm(0, M, residual, w, EPS, comm.output(M), stream=stream)  # call 2: rank 0 alone
        t0 = time.monotonic()
        try:
            comm.check()
        except CeTimeout as e:
            dt = time.monotonic() - t0
            want = f"did not arrive within {timeout_s:g} s (CE transport, call 2"
            expect(want in str(e), f"dead peer: message lacks {want!r}: {e}")
            expect(timeout_s * 0.9 <= dt <= timeout_s + 5, f"dead peer: check() raised after {dt:.1f} s")
            try:
                comm.all_reduce(0, 4)
                FAILS.append("dead peer: a call after CeTimeout did not raise")
            except CeTimeout:
                pass
        else:
            FAILS.append("dead peer: check() returned although the other ranks skipped the call")
    world.tp_comm.Barrier()
    if me != 0:  # the late ranks arrive
        comm.ar_add_norm(0, M, residual, w, EPS, comm.output(M), stream=stream)
    done, deadline = stream.record(), time.monotonic() + 30
    while not done.done and time.monotonic() < deadline:
        time.sleep(0.01)
    expect(done.done, f"dead peer: rank {me}'s stream did not drain within 30 s after the late call")
    if done.done:
        h, y = reference(parts, res0, weight, EPS)
        lo, hi = owned_rows(0, M, me, tp)
        rel_err(to_host(comm.output(M)), y, f"dead peer: late call out rank={me}")
        rel_err(to_host(residual[lo:hi]), h[lo:hi], f"dead peer: late call residual rank={me}")
    return comm


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one hidden size, fewer cases")
    args = ap.parse_args()
    world = dist.init(device="gpu")
    say, tp, sms = world.print0, world.tp_size, world.sm_count
    say(f"CE tests on {tp} ranks, GPU {world.gpu_name}{' (shared)' if getattr(world, 'shared_gpu', False) else ''}")
    keep = []

    def section(name, fn, *a, **k):
        r = run_section(world, name, fn, *a, **k)
        keep.append(r)
        return r

    me, M = world.tp_rank, 4608
    big = min(132, sms)
    main_comm = None
    for H in (8192,) if args.quick else (8192, 5120, 72):
        comm = CeComm(world, H, M)
        keep.append(comm)
        main_comm = main_comm or comm
        cases = [(0, 1, 1), (5, 6, 3), (3, 3 + max(1, tp - 1), 2), (3, 40, 3), (7, 7 + 4099, 8), (100, 1101, big),
                 (0, M, 8), (11, 11 + 4 * tp + 1, 1 + 2 * me)]  # the last: another CTA count on every rank
        section(f"exact H={H}", test_exact, world, comm, cases[:5] if args.quick else cases)
        for chunks in (1, 16):
            other = CeComm(world, H, 300, chunks=chunks)
            keep.append(other)
            section(f"exact H={H} chunks={chunks}", test_exact, world, other, [(0, 300, 8), (9, 9 + 37, 2), (1, 2, 1)])
        fcases = [(0, 1, 1, "private"), (3, 40, 3, "private"), (5, 5 + 257, 8, "registered"),
                  (100, 1101, 7, "staging"), (33, 33 + 2047, big, "private"), (1, 1 + 4099, 16, "registered"),
                  (0, M, 8, "private"), (9, 9 + 200, 1 + 3 * me, "private")]
        for k, (s, e, c, kind) in enumerate(fcases[::2] if args.quick else fcases):
            section(f"fused H={H} [{s},{e}) ctas={c} out={kind}", run_fused, world, comm, s, e, c, 10 * H + k, kind)
        try:
            from tw.comm.p2p import P2PComm, P2PUnavailable
            p2p = P2PComm(world, H, M, oneshot_max_tokens=0)
        except P2PUnavailable as err:
            say(f"  vs p2p H={H}: skipped, P2PComm unavailable: {err}")
        else:
            keep.append(p2p)
            if dist.env_flag("TW_P2P_RUNTIME_TP"):
                say("  vs p2p: skipped (TW_P2P_RUNTIME_TP=1 builds P2P with another kStep; CE compiles TP in)")
            else:
                section(f"bit-identical to p2p H={H}", test_same_as_p2p, world, comm, p2p,
                        [(0, 1, 1), (3, 40, 3), (7, 7 + 4099, 8), (100, 1101, big), (0, M, 8)])
    comm = main_comm  # H = 8192, 4608 rows, 4 chunks
    section("back-to-back, same rows x12", test_back_to_back, world, comm, [(5, 5 + 3001)], 12)
    section("back-to-back, halves A/B x12", test_back_to_back, world, comm, [(0, 2048), (2048, 4101)], 12)
    section("back-to-back, small and large x12", test_back_to_back, world, comm, [(3, 4), (0, M), (17, 17 + 63)], 12)
    section("CUDA graph replay x5 (registered out)", test_graph, world, comm, 300, 300 + 3000, 8, "registered")
    section("CUDA graph replay x5 (private out)", test_graph, world, comm, 1, 1 + 777, 5, "private")
    section("bad input raises", test_bad_input, world, comm)
    section("make('ce')", test_make, world, 8192)
    section("dead peer: CeTimeout, then a late call releases the stream", test_dead_peer, world, 1024)

    dist.shutdown(report(world, "CE"))  # MPI_Finalize, then os._exit: see the module docstring


if __name__ == "__main__":
    main()
