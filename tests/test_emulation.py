"""The emulated rank (tw/comm/emulation.py): one process plays rank r of a TP=N job over stand-in peers.

Exactness: my staging holds my rank-and-row encoded partials, my receive area the stand-in peers'
(encoded by their ranks); every sum over them is an integer exact in bf16 (tests/mpi_p2p.encoded), so
the loopback's reduced rows must EQUAL the exact sums, every stand-in must hold exactly what the kernel
pushed to it, and rows this rank does not own must be untouched. That proves the kernel reads every
stand-in and writes every owned row. The norm is checked against float64 (bf16: 1e-2; the CPU's
float32: 1e-5, docs/design.md#tolerances). CPU (NumPy twin, in CI) and GPU (the real kernel).
"""
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import ERR_OUT, fake_world, requires_gpu, run_mpi, usage_error
from tests.mpi_p2p import encoded
from tw import comm as transports
from tw.comm import owned_rows
from tw.comm.emulation import Emulation, allreduce_table, paper_allreduce_table, projected_nccl

HIDDEN = 256
EPS = 1e-5
# (tp, rank, start, end): every N; row counts not divisible by N; the last rank owning fewer rows (or
# none: 5 rows over 8 ranks); ranges that start inside the buffer (tokenweave's half B).
CASES = [(2, 0, 0, 1001), (2, 1, 0, 1001), (4, 3, 0, 1003), (4, 1, 37, 1000), (8, 0, 0, 1000), (8, 7, 0, 1001),
         (8, 6, 3, 8), (8, 4, 500, 1013)]
MAX_TOKENS = 1024


def _world(gpu: bool):
    if not gpu:
        return SimpleNamespace(is_gpu=False, tp_size=1, tp_rank=0, sm_count=0)
    import cupy as cp
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    return SimpleNamespace(is_gpu=True, tp_size=1, tp_rank=0, sm_count=sms, tp_comm=None)


class _Arrays:
    """NumPy <-> the transport's arrays (float32 on the CPU, bf16 cupy on the GPU)."""

    def __init__(self, gpu):
        self.gpu = gpu

    def put(self, dst, x):
        if self.gpu:
            import cupy as cp
            import ml_dtypes
            dst[...] = cp.asarray(np.ascontiguousarray(x).astype(ml_dtypes.bfloat16).view(np.uint16)).view(dst.dtype)
        else:
            dst[...] = x

    def get(self, x):
        if self.gpu:
            import cupy as cp
            import ml_dtypes
            cp.cuda.Device().synchronize()
            return x.view(cp.uint16).get().view(ml_dtypes.bfloat16).astype(np.float64)
        return np.asarray(x, dtype=np.float64)

    def new(self, shape):
        if self.gpu:
            import cupy as cp
            return cp.zeros(shape, dtype=cp.dtype("bfloat16"))
        return np.zeros(shape, np.float32)


def _make(gpu, tp, rank, pull=False, comm="full"):
    # Two-shot only, as the strategies run it (tw/schedule/strategies.transport_for): the one-shot path has every
    # rank reduce every row from its one-shot area, which these row-ownership checks do not describe.
    options = {"oneshot_max_tokens": 0} if gpu else {}
    return transports.make("p2p", _world(gpu), HIDDEN, MAX_TOKENS, "bfloat16" if gpu else np.float32,
                           sharded=True, emulate=Emulation(tp, rank, comm=comm), pull=pull, **options)


def _fill(comm, io, tp, rank, start, end):
    """Every staging (mine and the stand-ins') <- that rank's encoded partials (all rows: what a pulling
    kernel reads); my receive area <- the stand-ins' encoded partials of my rows (what pushing peers would
    have sent). Returns the encodings, [tp][MAX_TOKENS, HIDDEN] float64 (rows indexed absolutely)."""
    enc = [encoded(k, MAX_TOKENS, HIDDEN, tp).astype(np.float64) for k in range(tp)]
    for k in range(tp):
        io.put(comm.region(k, "staging"), enc[k])
    lo, hi = owned_rows(start, end, rank, tp)
    recv = comm.region(rank, "recv")
    for k in range(tp):
        if k != rank and hi > lo:
            io.put(recv[k, :hi - lo], enc[k][lo:hi])
    return enc


def _check_pushed_partials(comm, io, enc, tp, rank, start, end):
    """Phase 1: stand-in j's recv[me] holds exactly my partials of j's rows."""
    for j in range(tp):
        jl, jh = owned_rows(start, end, j, tp)
        if j != rank and jh > jl:
            got = io.get(comm.region(j, "recv")[rank, :jh - jl])
            assert np.array_equal(got, enc[rank][jl:jh]), f"stand-in {j} did not receive my partials of its rows"


def _run_all_reduce(gpu, tp, rank, start, end):
    io = _Arrays(gpu)
    comm = _make(gpu, tp, rank)
    enc = _fill(comm, io, tp, rank, start, end)
    comm.all_reduce(start, end)
    comm.check()
    lo, hi = owned_rows(start, end, rank, tp)
    want = sum(enc)[lo:hi]
    mine = io.get(comm.region(rank, "staging"))
    assert np.array_equal(mine[lo:hi], want), f"max error {np.abs(mine[lo:hi] - want).max()}"
    rest = np.r_[0:lo, hi:MAX_TOKENS]
    assert np.array_equal(mine[rest], enc[rank][rest]), "rows I do not own were written"
    for j in range(tp):
        if j != rank:
            assert np.array_equal(io.get(comm.region(j, "staging"))[lo:hi], want), f"stand-in {j} lacks my sums"
    _check_pushed_partials(comm, io, enc, tp, rank, start, end)
    comm.close()


def _run_fused(gpu, tp, rank, start, end, registered: bool, pull: bool = False):
    io = _Arrays(gpu)
    comm = _make(gpu, tp, rank, pull)
    enc = _fill(comm, io, tp, rank, start, end)
    rng = np.random.default_rng(1000 * tp + rank + end)
    res0 = rng.standard_normal((MAX_TOKENS, HIDDEN))
    w = 1 + 0.1 * rng.standard_normal(HIDDEN)
    residual, weight = io.new((MAX_TOKENS, HIDDEN)), io.new((HIDDEN,))
    io.put(residual, res0)
    io.put(weight, w)
    res0, w = io.get(residual), io.get(weight)       # the values as stored (bf16 on the GPU)
    out = comm.output(MAX_TOKENS) if registered else io.new((MAX_TOKENS, HIDDEN))
    comm.ar_add_norm(start, end, residual, weight, EPS, out)
    comm.check()
    lo, hi = owned_rows(start, end, rank, tp)
    tol = 1e-2 if gpu else 1e-5
    h = sum(enc)[lo:hi] + res0[lo:hi]
    y = h / np.sqrt(np.mean(h * h, axis=1, keepdims=True) + EPS) * w
    got_res, got_out = io.get(residual), io.get(out)
    if hi > lo:
        for name, got, ref in (("residual", got_res[lo:hi], h), ("out", got_out[lo:hi], y)):
            err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
            assert err <= tol, f"{name}: rel_err {err:.2e} > {tol} (max abs {np.abs(got - ref).max():.3g})"
    rest = np.r_[0:lo, hi:MAX_TOKENS]
    assert np.array_equal(got_res[rest], res0[rest]), "residual rows I do not own were written"
    for j in range(tp):
        if j != rank:   # registered: pushed into the stand-in's output; private: into its staging
            pushed = io.get(comm.region(j, "out" if registered or not gpu else "staging"))[lo:hi]
            assert np.array_equal(pushed, got_out[lo:hi]), f"stand-in {j} did not get my normed rows"
    if not pull:   # pulled: phase 1 moves no data
        _check_pushed_partials(comm, io, enc, tp, rank, start, end)
    comm.close()


@pytest.mark.parametrize("tp,rank,start,end", CASES)
def test_cpu_loopback_sums_are_exact(tp, rank, start, end):
    _run_all_reduce(False, tp, rank, start, end)
    _run_fused(False, tp, rank, start, end, registered=False)
    _run_fused(False, tp, rank, start, end, registered=False, pull=True)


@requires_gpu
@pytest.mark.parametrize("tp,rank,start,end", CASES)
def test_gpu_loopback_sums_are_exact(tp, rank, start, end):
    _run_all_reduce(True, tp, rank, start, end)
    _run_fused(True, tp, rank, start, end, registered=True)
    _run_fused(True, tp, rank, start, end, registered=False)
    _run_fused(True, tp, rank, start, end, registered=True, pull=True)
    _run_fused(True, tp, rank, start, end, registered=False, pull=True)


def _run_decomposition(gpu, tp, rank, start, end):
    """--emulate-comm norm: my rows <- add + norm of MY staging alone (no stand-in read or written);
    none: nothing written at all."""
    io = _Arrays(gpu)
    for mode in ("norm", "none"):
        comm = _make(gpu, tp, rank, comm=mode)
        enc = _fill(comm, io, tp, rank, start, end)
        before = [io.get(comm.region(j, name)) for j in range(tp) for name in ("staging", "out", "recv")]
        res0 = np.random.default_rng(tp + rank).standard_normal((MAX_TOKENS, HIDDEN))
        residual, weight, out = io.new((MAX_TOKENS, HIDDEN)), io.new((HIDDEN,)), io.new((MAX_TOKENS, HIDDEN))
        io.put(residual, res0)
        io.put(weight, np.ones(HIDDEN))
        res0 = io.get(residual)
        comm.ar_add_norm(start, end, residual, weight, EPS, out)
        comm.check()
        lo, hi = owned_rows(start, end, rank, tp)
        got_res, got_out = io.get(residual), io.get(out)
        if mode == "none":
            assert np.array_equal(got_res, res0) and not got_out.any(), "--emulate-comm none wrote something"
        elif hi > lo:
            h = enc[rank][lo:hi] + res0[lo:hi]
            y = h / np.sqrt(np.mean(h * h, axis=1, keepdims=True) + EPS)
            err = np.linalg.norm(got_out[lo:hi] - y) / np.linalg.norm(y)
            assert err <= (1e-2 if gpu else 1e-5), f"norm-only rows: rel_err {err:.2e}"
            rest = np.r_[0:lo, hi:MAX_TOKENS]
            assert not got_out[rest].any(), "norm-only wrote rows this rank does not own"
        after = [io.get(comm.region(j, name)) for j in range(tp) for name in ("staging", "out", "recv")]
        assert all(np.array_equal(a, b) for a, b in zip(before, after)), f"--emulate-comm {mode} touched peer memory"
        comm.close()


@pytest.mark.parametrize("tp,rank,start,end", CASES[::3])
def test_cpu_decomposition_modes(tp, rank, start, end):
    _run_decomposition(False, tp, rank, start, end)


@requires_gpu
@pytest.mark.parametrize("tp,rank,start,end", CASES[::3])
def test_gpu_decomposition_modes(tp, rank, start, end):
    _run_decomposition(True, tp, rank, start, end)


@requires_gpu
def test_gpu_emulated_link_floors_each_phase():
    """--emulate-link-gbps: a fused call of 8192 rows at TP=2 pushes 4096 rows each way per phase; at
    10 GB/s that is 6.7 ms a phase, so the call takes at least 13.4 ms, and its sums stay exact."""
    import cupy as cp
    io = _Arrays(True)
    comm = transports.make("p2p", _world(True), 8192, 8192, "bfloat16", emulate=Emulation(2, 0, 10.0),
                           oneshot_max_tokens=0)
    residual, weight = io.new((8192, 8192)), io.new((8192,))
    weight.fill(1)
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    comm.ar_add_norm(0, 8192, residual, weight, EPS, comm.output(8192))
    end.record()
    end.synchronize()
    comm.check()
    floor_ms = 2 * 4096 * 8192 * 2 / 10.0 / 1e6
    assert cp.cuda.get_elapsed_time(start, end) >= 0.99 * floor_ms


@requires_gpu
def test_gpu_loopback_replays_many_calls_without_peers():
    """The preset arrival flags hold call after call: 200 calls, then the sums are still exact."""
    io = _Arrays(True)
    comm = _make(True, 8, 3)
    for _ in range(200):
        comm.all_reduce(0, 999)
    comm.check()
    enc = _fill(comm, io, 8, 3, 0, 999)
    comm.all_reduce(0, 999)
    lo, hi = owned_rows(0, 999, 3, 8)
    assert np.array_equal(io.get(comm.region(3, "staging"))[lo:hi], sum(enc)[lo:hi])


def test_other_transports_refuse_emulation():
    for kind, why in (("nccl", "NCCL needs one real rank per GPU"), ("ce", "runs on the SMs")):
        with pytest.raises(ValueError, match=why):
            transports.make(kind, _world(False), HIDDEN, 64, np.float32, emulate=Emulation(2))


def test_emulation_bounds():
    with pytest.raises(ValueError, match=r"--emulate-tp 9: expected 2..8"):
        Emulation(9)
    with pytest.raises(ValueError, match=r"--emulate-rank 2: expected 0..1"):
        Emulation(2, 2)


def test_projected_nccl_interpolates_the_named_tables(tmp_path):
    """TP=8: the paper's figure_4.csv points come back exactly at their sizes, in between linearly; the
    projection is nocomm + 2 x layers all-reduces and names its source."""
    t = paper_allreduce_table()
    assert t.tp == 8 and "figure_4.csv" in t.source
    row = lambda bl: bl * 8192 * 2  # noqa: E731 - bytes of BL rows of hidden 8192, bf16
    for bl, us in ((64, 35.99999845027924), (8192, 646.1120247840881), (32768, 2402.463912963867)):
        assert t.us(row(bl)) == pytest.approx(us)
    mid = t.us(row(6144))   # between 4096 (347.6 us) and 8192 (646.1 us)
    assert 347.6 < mid < 646.2
    p = projected_nccl(10.0, 8192, 8192, 4, t)
    assert p["projected_nccl_ms"] == pytest.approx(10.0 + 8 * 0.6461120247840881)
    assert p["projected_nccl_source"] == t.source
    assert projected_nccl(10.0, 8192, 8192, 4, None)["projected_nccl_ms"] is None
    assert allreduce_table(4, tmp_path) is None


def test_latency_emulated_on_the_cpu(tmp_path):
    """The main job as one emulated rank of TP=4 on the CPU: nocomm, fused and tokenweave run (nccl is
    dropped from the defaults and projected), rows carry the emulation's columns."""
    out = tmp_path / "rows.jsonl"
    proc = run_mpi(1, ["-m", "experiments.latency", "--device", "cpu", "--emulate-tp", "4", "--emulate-rank", "3",
                       "--tokens", "101", "600", "--min-split-tokens", "512", "--out", str(out)], timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "emulated: one rank of TP=4 on one GPU; link time not included; nccl projected" in proc.stdout
    import json
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["strategy"] for r in rows} == {"nocomm", "fused", "tokenweave"}
    assert all(r["emulated_tp"] == 4 and r["emulated_rank"] == 3 and "stand-in" in r["stand_ins"] for r in rows)
    assert all(r["projected_nccl_ms"] is None and "no measured" in r["projected_nccl_source"] for r in rows)
    assert [r["split_at"] for r in rows if r["strategy"] == "tokenweave"] == [None, 300]


NEEDS_N = "needs --emulate-tp N (the TP degree whose rank to play)"
NCCL_NEEDS_RANKS = ("with --emulate-tp: NCCL needs one real rank per GPU; an emulated run reports nccl as "
                    "projected_nccl_ms instead (drop them from --strategies)")


@pytest.mark.parametrize("args,msg", [
    (["--emulate-tp", "4", "--shard-as-tp", "4"], "--emulate-tp and --shard-as-tp do not combine: --emulate-tp N "
                                                  "already holds the TP=N shards; drop --shard-as-tp"),
    (["--emulate-tp", "16"], "--emulate-tp 16: expected 2..8 (the P2P kernel's TP limit)"),
    (["--emulate-tp", "2", "--emulate-rank", "2"], "--emulate-rank 2: expected 0..1 (a rank of TP=2)"),
    (["--emulate-rank", "1"], f"--emulate-rank {NEEDS_N}"),
    (["--emulate-link-gbps", "300"], f"--emulate-link-gbps {NEEDS_N}"),
    (["--emulate-comm", "norm"], f"--emulate-comm {NEEDS_N}"),
    (["--emulate-tp", "2", "--check"], "--check with --emulate-tp 2: the emulated rank computes only its own 1/2 of "
                                       "each norm's rows (the stand-in peers compute nothing), so its output is not "
                                       "the model's; check correctness on ranks sharing a GPU (TW_SHARE_GPU=1) "
                                       "instead"),
    (["--emulate-tp", "2", "--strategies", "nccl", "fused"], f"--strategies nccl {NCCL_NEEDS_RANKS}"),
    (["--emulate-tp", "2", "--strategies", "finegrained2"], f"--strategies finegrained2 {NCCL_NEEDS_RANKS}"),
    (["--emulate-tp", "2", "--transport", "ce"], "--transport ce with --emulate-tp: only p2p is emulated (nccl needs "
                                                 "real ranks; a same-device copy runs on the SMs, so a ce emulation "
                                                 "would not be faithful)"),
    (["--emulate-tp", "3"], "tiny: TP=3 must divide num_heads (8) and num_kv_heads (4); valid TP degrees: [1, 2, 4]"),
])
def test_bad_emulation_flags_are_usage_errors(args, msg):
    from experiments import latency
    argv = ["--device", "cpu", "--tokens", "64", "--out", ERR_OUT, *args]
    assert usage_error(latency.main, argv, fake_world(tp=1)) == msg


def test_emulation_with_several_ranks_is_a_usage_error():
    from experiments import latency
    argv = ["--device", "cpu", "--emulate-tp", "2", "--tokens", "64", "--out", ERR_OUT]
    assert usage_error(latency.main, argv, fake_world(tp=2)) == (
        "--emulate-tp 2 plays one rank of TP=2 in ONE process; this job has 2 ranks: start it without mpirun -n "
        "(or with -n 1)")


def test_fidelity_tables_in_the_docs_match_the_files():
    """docs/hardware.md#emulation-fidelity quotes experiments.fidelity's tables, generated from the files."""
    from pathlib import Path

    from experiments import fidelity
    doc = (Path(__file__).resolve().parent.parent / "docs" / "hardware.md").read_text()
    assert fidelity.tables() in doc


def test_readme_emulated_table_matches_the_files():
    from pathlib import Path

    from experiments import fidelity
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert fidelity.baseline_table() in readme
