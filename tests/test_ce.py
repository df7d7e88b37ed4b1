"""The copy-engine transport (tw/comm/ce.py, cuda/ce_norm.cu).

CPU: the factory (`make("ce", cpu_world)` is the cpu transport), the argument checks that run before any
GPU call, and the cross-rank protocol itself: `ce.plan` gives every operation of one call in issue order,
and `Simulator` runs the plans of all TP ranks with a random interleaving of their streams, checking that
nothing deadlocks, no flag write is lost, every read sees the data of its own call, no rows are overwritten
while an operation reads or writes them, and every flag is back at its initial value after each call (what
CUDA-graph replay needs). nvcc: the kernel compiles and its block size is the one ce.py launches.
GPU: tests/mpi_ce.py on 2 ranks (sharing one GPU when the machine has one).
"""
import random
import re
import shutil
import types
from collections import defaultdict, deque

import numpy as np
import pytest
from mpi4py import MPI

from conftest import requires_gpus, run_mpi
from tw import comm as transports
from tw.runtime import kernels
from tw.comm import ce, owned_rows


def cpu_world():
    return types.SimpleNamespace(is_gpu=False, tp_size=1, tp_rank=0, tp_comm=MPI.COMM_SELF, rank=0, sm_count=0)


# ----------------------------------------------------------------------------- factory and arguments
def test_the_transport_table_names_every_kind_and_name():
    """tw/comm's docstring is where a reader meets the transports: its table lists every kind `make`
    takes, and its contract every `name` a row can record."""
    import re

    from tw.comm import ce, cpu, multimem, nocomm, p2p   # (nccl.py needs CuPy to import: its name is "nccl")
    doc = transports.__doc__
    assert re.findall(r"^\| `([a-z0-9]+)` ", doc, re.M) == ["nccl", "p2p", "none", "multimem", "ce"]
    assert set(transports.KINDS) == {"nccl", "p2p", "none", "multimem", "ce"}
    names = {ce.CeComm.name, cpu.CpuComm.name, cpu.CpuLoopback.name, multimem.MultimemComm.name,
             "nccl", nocomm.NoComm.name, p2p.P2PComm.name}
    line = next(line for line in doc.splitlines() if line.strip().startswith("comm.name"))
    assert names == set(re.findall(r'"([a-z0-9]+)"', line)), line


def test_make_ce_on_a_cpu_world_is_the_cpu_transport():
    assert "ce" in transports.KINDS
    comm = transports.make("ce", cpu_world(), 16, 8, np.float32)
    assert comm.name == "cpu" and comm.sharded
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 16)).astype(np.float32)
    res = rng.standard_normal((8, 16)).astype(np.float32)
    comm.staging(8)[...] = x
    out, res_ref = np.zeros_like(x), res.copy()
    comm.ar_add_norm(2, 7, res, np.ones(16, np.float32), 1e-5, out)
    h = x[2:7] + res_ref[2:7]
    np.testing.assert_allclose(out[2:7], h / np.sqrt(np.mean(h * h, axis=1, keepdims=True) + 1e-5), rtol=1e-5)
    np.testing.assert_allclose(res[2:7], h, rtol=1e-6)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(sharded=False), "sharded order only"),
    (dict(dtype="float16"), "bfloat16"),
    (dict(hidden=12), "multiple of 8"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(chunks=0), "chunks"),
    (dict(chunks=ce.MAX_CHUNKS + 1), "chunks"),
    (dict(timeout_s=0), "timeout_s"),
])
def test_bad_arguments_raise_before_any_gpu_call(kwargs, needle):
    args = dict(hidden=16, max_tokens=8, dtype="bfloat16")
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle):
        ce.CeComm(cpu_world(), args.pop("hidden"), args.pop("max_tokens"), **args)


def test_cpu_world_is_unavailable_not_a_crash():
    with pytest.raises(ce.CeUnavailable, match="needs GPUs"):
        ce.CeComm(cpu_world(), 16, 8)


# ----------------------------------------------------------------------------- the plan's rows
@pytest.mark.parametrize("tp", [2, 3, 4, 8])
@pytest.mark.parametrize("chunks", [1, 3, 4, 16])
def test_plan_covers_exactly_the_owned_rows(tp, chunks):
    max_tokens = 53
    cmax = -(-max_tokens // tp)
    for start, end in [(0, 53), (5, 6), (3, 30), (11, 53), (0, 1), (7, 7 + tp - 1), (1, 1 + 4 * tp + 1)]:
        sent = defaultdict(list)  # (src, dst) -> staging rows sent
        for r in range(tp):
            ops = ce.plan(r, tp, start, end, chunks, cmax)
            lo, hi = owned_rows(start, end, r, tp)
            normed = [row for op in ops if op[1] == "kernel" for row in range(op[2], op[3])]
            assert normed == list(range(lo, hi)) and all(op[4] == lo for op in ops if op[1] == "kernel")
            for op in ops:
                if op[1] == "copy" and op[3] == "recv":
                    _, _, dst, _, dst_row, src_buf, src_row, rows = op
                    dlo = owned_rows(start, end, dst, tp)[0]
                    assert src_buf == "staging" and r * cmax <= dst_row and dst_row + rows <= (r + 1) * cmax
                    assert dst_row - r * cmax == src_row - dlo  # recv[src][row - own_lo]
                    sent[(r, dst)] += range(src_row, src_row + rows)
                elif op[1] == "copy":  # the all-gather of my rows
                    assert op[4] == op[6] == lo and op[7] == hi - lo and op[3] == op[5] == "out"
        for r in range(tp):
            for q in range(tp):
                if q != r:
                    assert sent[(r, q)] == list(range(*owned_rows(start, end, q, tp)))


# ----------------------------------------------------------------------------- the protocol, simulated
class ProtocolError(AssertionError):
    pass


class Simulator:
    """The plans of all ranks on their streams, one operation step at a time in a random order. A stream
    runs its operations in order (the next starts after the previous ended); copies, kernels, the GEMM
    writing staging and the consumer reading the result take two steps (begin, end), so other streams'
    steps fall inside them. merged=True puts each rank's two streams into one queue in issue order (as if
    they shared one hardware queue). Memory holds one tag per row: ("part", call, rank), ("y", call), ("sum", call)."""

    def __init__(self, tp, chunks, max_tokens, rng, merged=False):
        self.tp, self.chunks, self.max_tokens, self.rng, self.merged = tp, chunks, max_tokens, rng, merged
        self.cmax = -(-max_tokens // tp)
        self.flags = [[0] * ce.NUM_FLAGS for _ in range(tp)]  # CeComm zeroes them; calls leave them 0
        self.mem = {(r, b): [None] * (tp * self.cmax if b == "recv" else max_tokens)
                    for r in range(tp) for b in ("staging", "recv", "out")}
        self.reading, self.writing = defaultdict(int), defaultdict(int)
        self.queues = defaultdict(deque)
        self.events = set()
        self.calls = 0

    def issue(self, start, end, norm=True):
        k = self.calls
        self.calls += 1
        for r in range(self.tp):
            ops = [("main", "gemm", start, end)] + ce.plan(r, self.tp, start, end, self.chunks, self.cmax, norm)
            ops.append(("main", "consume", start, end, norm))
            for op in ops:
                self.queues[(r, "one" if self.merged else op[0])].append([op, k, None, norm])

    # what an operation reads (rows with the tag they must hold) and writes (rows, tag or a copy of the source)
    def _access(self, r, op, k, norm):
        kind = op[1]
        if kind == "gemm":
            return [], [((r, "staging", row), ("part", k, r)) for row in range(op[2], op[3])]
        if kind == "consume":
            buf, tag = ("out", ("y", k)) if op[4] else ("staging", ("sum", k))
            return [((r, buf, row), tag) for row in range(op[2], op[3])], []
        if kind == "copy":
            _, _, dst, dst_buf, dst_row, src_buf, src_row, rows = op
            tag = ("part", k, r) if dst_buf == "recv" else (("y", k) if src_buf == "out" else ("sum", k))
            return ([((r, src_buf, src_row + i), tag) for i in range(rows)],
                    [((dst, dst_buf, dst_row + i), tag) for i in range(rows)])
        a, b, own_lo = op[2:]  # kernel
        reads = [((r, "staging", row), ("part", k, r)) for row in range(a, b)]
        reads += [((r, "recv", q * self.cmax + row - own_lo), ("part", k, q))
                  for q in range(self.tp) if q != r for row in range(a, b)]
        out = [((r, "out", row), ("y", k)) if norm else ((r, "staging", row), ("sum", k)) for row in range(a, b)]
        return reads, out

    def _runnable(self, r, entry):
        op, k = entry[:2]
        if op[1] == "wait":
            return self.flags[r][op[2]] == 1
        if op[1] == "wait_event":
            return self.merged or (r, op[2], k) in self.events
        return True

    def _step(self, key):
        r = key[0]
        entry = self.queues[key][0]
        op, k, begun, norm = entry
        kind = op[1]
        where = f"rank {r} call {k} {op}"
        if kind in ("wait", "wait_event"):
            self.queues[key].popleft()
        elif kind == "record":
            self.events.add((r, op[2], k))
            self.queues[key].popleft()
        elif kind == "write":
            _, _, dst, word, value = op
            if value == 1 and self.flags[dst][word] == 1:
                raise ProtocolError(f"lost signal: {where} sets a flag that is still set")
            if value == 0 and self.flags[dst][word] == 0:
                raise ProtocolError(f"{where} resets a flag that is not set")
            self.flags[dst][word] = value
            self.queues[key].popleft()
        elif begun is None:  # begin: reads must see their call's data, nothing may be in use by another op
            reads, writes = self._access(r, op, k, norm)
            for loc, tag in reads:
                if self.writing[loc]:
                    raise ProtocolError(f"{where} reads {loc} while another operation writes it")
                if self.mem[loc[:2]][loc[2]] != tag:
                    raise ProtocolError(f"{where} reads {loc} = {self.mem[loc[:2]][loc[2]]}, expected {tag}")
            for loc, _ in writes:
                if self.reading[loc] or self.writing[loc]:
                    raise ProtocolError(f"{where} overwrites {loc} while another operation uses it")
            for loc, _ in reads:
                self.reading[loc] += 1
            for loc, _ in writes:
                self.writing[loc] += 1
            entry[2] = (reads, writes)
        else:  # end
            reads, writes = begun
            for loc, _ in reads:
                self.reading[loc] -= 1
            for loc, tag in writes:
                self.writing[loc] -= 1
                self.mem[loc[:2]][loc[2]] = tag
            self.queues[key].popleft()

    def run(self):
        while True:
            keys = [key for key, q in self.queues.items() if q]
            if not keys:
                break
            ready = [key for key in keys if self._runnable(key[0], self.queues[key][0])]
            if not ready:
                heads = {key: self.queues[key][0][:2] for key in keys}
                raise ProtocolError(f"deadlock: every stream waits: {heads}")
            self._step(self.rng.choice(ready))
        if any(any(f) for f in self.flags):
            raise ProtocolError("flags are not back at 0 after the calls")


def _random_calls(rng, max_tokens, tp, num):
    calls = []
    for _ in range(num):
        n = rng.choice([1, tp - 1 or 1, rng.randint(1, max_tokens), max_tokens, rng.randint(1, 2 * tp)])
        start = rng.randint(0, max_tokens - n)
        calls.append((start, start + n, rng.random() < 0.75))
    return calls


@pytest.mark.parametrize("tp", [2, 3, 4])
@pytest.mark.parametrize("chunks", [1, 2, 4])
@pytest.mark.parametrize("merged", [False, True])
def test_protocol_random_interleavings(tp, chunks, merged):
    for seed in range(25):
        rng = random.Random(1000 * tp + 10 * chunks + seed)
        sim = Simulator(tp, chunks, 13, rng, merged)
        for start, end, norm in _random_calls(rng, 13, tp, 6):
            sim.issue(start, end, norm)
        sim.run()


def test_protocol_replays_one_call_like_a_cuda_graph():
    """The same call again and again (a graph replays its captured constants): still correct."""
    for seed in range(20):
        sim = Simulator(2, 4, 37, random.Random(seed))
        for _ in range(5):
            sim.issue(3, 34)
        sim.run()


def _without(pred):
    plan = ce.plan
    return lambda *a, **k: [op for op in plan(*a, **k) if not pred(op)]


def _gathered_word(op):
    word = op[2] if op[1] == "wait" else op[3] if op[1] == "write" else -1
    return ce.GATHERED <= word < ce.PROBE


@pytest.mark.parametrize("what,pred", [
    ("the gathered waits", lambda op: op[1] == "wait" and _gathered_word(op)),
    ("the resets of the ready flags", lambda op: op[1] == "write" and op[4] == 0 and not _gathered_word(op)),
    ("the ready waits", lambda op: op[1] == "wait" and not _gathered_word(op)),
])
def test_simulator_catches_a_broken_protocol(monkeypatch, what, pred):
    """The checks are real: without `what`, some interleaving of four calls fails."""
    monkeypatch.setattr(ce, "plan", _without(pred))
    failures = []
    for seed in range(40):
        sim = Simulator(2, 2, 16, random.Random(seed))
        for _ in range(4):
            sim.issue(0, 16)
        try:
            sim.run()
        except ProtocolError as e:
            failures.append(str(e))
    assert len(failures) >= 5, (what, failures[:3])


# ----------------------------------------------------------------------------- the kernel
needs_nvcc = pytest.mark.skipif(not (shutil.which("nvcc") or __import__("os").path.exists("/usr/local/cuda/bin/nvcc")),
                                reason="nvcc not installed")


@needs_nvcc
@pytest.mark.parametrize("tp", [None, 2, 8])
def test_kernel_compiles_with_the_block_size_ce_launches(tp):
    ptx = kernels.compile("ce_norm", "sm_90a", {"TW_TP": tp} if tp else None, kind="ptx").read_text()
    entries = dict(re.findall(r"\.entry (ce_\w+)\((.*?)\{", ptx, re.S))
    assert set(entries) == {"ce_reduce_add_norm", "ce_reduce"}
    for name, head in entries.items():
        assert f".maxntid {ce.THREADS}, 1, 1" in head, name
    assert kernels.compile("ce_norm", "sm_90a", {"TW_TP": tp} if tp else None).stat().st_size > 0


def test_kernel_constants_match_the_host():
    src = kernels.source_path("ce_norm").read_text()
    # kThreads and kMaxTp come from the one layout header the host reads too (tw/comm/layout.py)
    assert "using tw::p2p::kThreads;" in src and "using tw::p2p::kMaxTp;" in src
    includes = re.findall(r'#include "(.*?)"', src)
    assert "peer_layout.cuh" in includes
    assert "peer_sync.cuh" not in includes  # never waits on another GPU's flags: the copy engines do the sync


# ----------------------------------------------------------------------------- GPU
@requires_gpus(1)
@pytest.mark.parametrize("ranks,args", [(2, []), (4, ["--quick"])])
def test_ce_on_gpu_ranks(ranks, args):
    """tests/mpi_ce.py on 2 ranks (every case) and 4 (--quick); with fewer GPUs they share them
    (TW_SHARE_GPU=1)."""
    proc = run_mpi(ranks, ["-m", "tests.mpi_ce", *args], timeout=900, env={"TW_SHARE_GPU": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "CE TESTS PASSED" in proc.stdout, out[-6000:]
