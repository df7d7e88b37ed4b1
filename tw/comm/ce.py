"""Copy-engine (CE) transport: the fused AllReduce + residual-add + RMSNorm with the bytes moved by copy
engines (cudaMemcpyAsync between CUDA-IPC peer pointers) and the ranks ordered by stream memory operations
(cuStreamWriteValue32 / cuStreamWaitValue32); the SMs only run the local add + norm (cuda/ce_norm.cu).
Sharded order only (TokenWeave's): ReduceScatter -> add + norm of my rows -> AllGather.

BUFFERS: one cudaMalloc per rank, shared by CUDA IPC as in P2PComm:
    staging [max_tokens, H] bf16   the row-parallel GEMM's partial output
    recv    [tp, C, H], C = ceil(max_tokens / tp): recv[src][i] = src's partial of my owned row own_lo + i
    out     [max_tokens, H]        registered output: owners copy their normalized rows into every rank's
    flags   uint32, 0 at start and after every call: ready[src][chunk] (src's partials of that chunk of my
            rows are in my recv), gathered[src] (src's normalized rows are in my out); probe words

ONE CALL on rank p, rows [start, end); owned_rows gives each rank's block, cut into `chunks` chunks:
    side stream, forked from the caller's stream by an event and issued before the caller's part:
        every chunk c, peer q: copy my staging rows of q's chunk c into q's recv[p]; set q.ready[p][c] = 1
    caller's stream:
        every chunk c: wait ready[q][c] == 1 for every peer q, reset them to 0; kernel on chunk c of my rows
        every peer q: copy my out rows (all_reduce: staging rows) into q's; set q.gathered[p] = 1
        wait gathered[q] == 1 for every peer q, reset them to 0; wait for the side stream (event)
        a private `out`: copy rows [start, end) of the registered out into it
So chunk c's copies run while chunk c-1 is normalized. The sequence is data (`plan`), run by CeComm._run;
tests/test_ce.py runs all ranks' plans through a random-interleaving simulator (deadlock, lost flag writes,
stale reads, rows overwritten while in use, flags back at 0).

MEMORY ORDERING. Flag writes use CU_STREAM_WRITE_VALUE_DEFAULT: a memory fence "similar to
__threadfence_system() but scoped to the stream" precedes the write, so all earlier work of that stream
(copies into the peer, kernels, earlier flag writes) is performed before the flag is visible. Waits are
cuStreamWaitValue32(EQ 1): later work of the stream starts after the value was seen.
(1) Every read sees its data: chunk c's kernel follows every peer's ready[q][c], set after q's copy of those
    rows; the gathered rows are used only after every peer's gathered[q].
(2) Nothing is overwritten while read. recv: q writes it in call k+1 from a side stream forked after q's call
    k ended, i.e. after q saw my gathered flag of call k, which I set after my last kernel (recv's last
    reader) of call k: the AllGather is the back-pressure (a separate "free" flag adds nothing; the
    simulator shows it). My out (all_reduce: staging) rows: peers write them after my ready flags of that
    call, which my side stream sets after its fork, i.e. after all earlier work of my stream (readers of out,
    the GEMM writing staging). A peer's staging rows that all_reduce overwrites were copied to me before the
    ready flags I waited for. My staging is read by my side stream, joined before the call ends.
(3) No flag write is lost: each flag goes set -> seen -> reset, and its next set is causally after the reset.
    ready[q][c] at p: p resets it before its kernels -> p sets q.gathered[p] -> q ends call k -> q's next
    fork -> q sets it. gathered[q] at p: p resets it, ends the call -> p's next fork -> p sets q.ready[p] ->
    q's kernels -> q sets it.
CUDA graphs: every write writes a constant and the flags return to 0 after each call, so a captured call
replays correctly (no host-side epoch). The side part is issued first, so the protocol needs no concurrency
between the two streams (it completes even if they share a hardware queue); the join is implied by the
gathered flags and is there for stream capture and so that CUDA sees the order as an event dependency.

FAILURE. A stream wait never times out. check() records an event on every stream a call (or a captured call,
whose graph replays there) ran on and polls it for up to timeout_s, then raises CeTimeout. The process cannot
cancel the blocked stream afterwards: the job must end (the caller raises; tw.dist aborts the job).

Contract as P2PComm: the same calls, ranges and order on every rank, stream-ordered on each rank; `ctas` only
sizes the local kernel, so it may differ between ranks and calls. Ranks sharing one GPU (TW_SHARE_GPU=1): IPC
works across processes, but the copies are same-device copies, which may run on the SMs: correct, not
zero-SM. Results are bit-identical to the P2P transport's (the same arithmetic, compiled with the same TW_TP).
"""
from __future__ import annotations

import time

import numpy as np

from tw.comm import check_range, owned_rows
from tw.comm.ipc import SharedBuffer, check_norm, check_rows
from tw.comm.layout import MAX_TP, THREADS
from tw.comm.peer import PeerComm
from tw.runtime import driver, kernels

MAX_CHUNKS = 16   # chunks per owner's block at most (MAX_TP, THREADS: tw/comm/layout.py, as the kernel)
DEFAULT_CTAS = 8
# flag words: ready[src][chunk], gathered[src], probe[3][src]
READY, GATHERED, PROBE = 0, MAX_TP * MAX_CHUNKS, MAX_TP * MAX_CHUNKS + MAX_TP
NUM_FLAGS = PROBE + 3 * MAX_TP


class CeUnavailable(RuntimeError):
    """CUDA IPC / peer copies / stream memory operations do not work between the TP ranks (all ranks agree)."""


class CeTimeout(RuntimeError):
    """A peer did not arrive within timeout_s; this process's stream stays blocked, the job must end."""


def ready(src: int, c: int) -> int:
    return READY + src * MAX_CHUNKS + c


def split(lo: int, hi: int, parts: int, i: int) -> tuple[int, int]:
    """Rows of [lo, hi) in part i of `parts` (even split, the first (hi - lo) % parts get one more)."""
    base, rem = divmod(hi - lo, parts)
    a = lo + i * base + min(i, rem)
    return a, a + base + (i < rem)


def plan(rank: int, tp: int, start: int, end: int, chunks: int, chunk_max: int, norm: bool = True) -> list[tuple]:
    """One call's operations on `rank`, in issue order (the module docstring's sequence), as tuples:
    (stream, "record" | "wait_event", event), (stream, "wait", my flag word),
    (stream, "write", rank, flag word, value), (stream, "copy", dst rank, dst buffer, dst row, src buffer,
    src row, rows) with a local source and rows of recv counted as src * chunk_max + i,
    (stream, "kernel", first row, end row, own_lo). stream: "main" (the caller's) or "side"."""
    peers = [(rank + k) % tp for k in range(1, tp)]
    own = [owned_rows(start, end, q, tp) for q in range(tp)]
    ops = [("main", "record", "fork"), ("side", "wait_event", "fork")]
    for c in range(chunks):
        for q in peers:
            lo, hi = split(*own[q], chunks, c)
            if hi > lo:
                ops.append(("side", "copy", q, "recv", rank * chunk_max + lo - own[q][0], "staging", lo, hi - lo))
            ops.append(("side", "write", q, ready(rank, c), 1))
    ops.append(("side", "record", "join"))
    lo, hi = own[rank]
    for c in range(chunks):
        ops += [("main", "wait", ready(q, c)) for q in peers]
        ops += [("main", "write", rank, ready(q, c), 0) for q in peers]
        a, b = split(lo, hi, chunks, c)
        if b > a:
            ops.append(("main", "kernel", a, b, lo))
    buf = "out" if norm else "staging"
    if hi > lo:
        ops += [("main", "copy", q, buf, lo, buf, lo, hi - lo) for q in peers]
    ops += [("main", "write", q, GATHERED + rank, 1) for q in peers]
    ops += [("main", "wait", GATHERED + q) for q in peers]
    ops += [("main", "write", rank, GATHERED + q, 0) for q in peers]
    ops.append(("main", "wait_event", "join"))
    return ops


class CeComm(PeerComm):
    """Fused AllReduce + residual-add + RMSNorm over copy engines and stream memory operations.

    world: tw.runtime.dist.World on GPUs; hidden: row width (a multiple of 8); max_tokens: rows of the staging
    buffer. ctas: default CTA count of the local kernel (1..SM count). chunks: pieces each owner's rows are
    cut into, so copies overlap the norm (1..16, the same on every rank). timeout_s: how long check() waits
    for the streams before it raises CeTimeout. sharded=False raises: the CE transport has the sharded
    order only. `out` of ar_add_norm other than comm.output(n) costs a final device-local D2D copy of rows
    [start, end) that the driver may run on the SMs; passing comm.output(n) avoids it.
    """

    name = "ce"

    def __init__(self, world, hidden: int, max_tokens: int, dtype: str = "bfloat16", *, sharded: bool = True,
                 ctas: int | None = None, chunks: int = 4, timeout_s: float = 30.0):
        if not sharded:
            raise ValueError("ce implements the sharded order only (sharded=True): use the p2p or nccl "
                             "transport for the baseline order")
        self.check_args(hidden, max_tokens, dtype)
        if not 1 <= int(chunks) <= MAX_CHUNKS:
            raise ValueError(f"chunks={chunks} must be in 1..{MAX_CHUNKS}")
        if not float(timeout_s) > 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0")
        if not world.is_gpu:
            raise CeUnavailable("CeComm needs GPUs; this world runs on the CPU")
        if world.tp_size > MAX_TP:
            raise ValueError(f"CeComm supports TP <= {MAX_TP}, got {world.tp_size}")
        import cupy as cp
        self.world, self.hidden, self.max_tokens, self.sharded = world, hidden, max_tokens, True
        self.dtype = cp.dtype("bfloat16")
        self.rank, self.tp, self.num_sms = world.tp_rank, world.tp_size, world.sm_count
        self.ctas = self._check_ctas(ctas if ctas is not None else min(DEFAULT_CTAS, self.num_sms))
        self.chunks, self.timeout_s = int(chunks), float(timeout_s)
        self.chunk_max = -(-max_tokens // self.tp)
        self._row = hidden * 2
        self._fns, self._streams, self._calls, self._broken = {}, {}, 0, None

        sizes = {"staging": max_tokens * self._row, "recv": self.tp * self.chunk_max * self._row,
                 "out": max_tokens * self._row, "flags": NUM_FLAGS * 4}
        err = None
        try:  # the driver's stream memory operations (cuda-bindings)
            self._drv = drv = driver.api()
            self._eq = int(drv.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_EQ)
            self._barrier = int(drv.CUstreamWriteValue_flags.CU_STREAM_WRITE_VALUE_DEFAULT)
        except Exception as e:  # noqa: BLE001 - reported collectively by SharedBuffer
            err = e
        self._side = cp.cuda.Stream(non_blocking=True)
        self._events = {"fork": cp.cuda.Event(disable_timing=True), "join": cp.cuda.Event(disable_timing=True)}
        self.buf = SharedBuffer(world, sizes, CeUnavailable, "the CE transport", prior_error=err)
        self._probe()

    # ------------------------------------------------------------------ set-up helpers
    @staticmethod
    def _probe_value(src: int, dst: int, kind: int) -> int:
        return 0x7C000000 | (kind << 16) | (src << 8) | dst

    def _probe(self) -> None:
        """Every rank sets a word in every peer with cuStreamWriteValue32 and another by a peer copy, then
        reads its own words back and runs a stream wait on one (already satisfied, so it cannot hang)."""
        import cupy as cp
        me, s, err = self.rank, self._side, None
        peers = [q for q in range(self.tp) if q != me]
        try:
            for q in peers:
                self._write(s, self._flag(q, PROBE + me), self._probe_value(me, q, 0))
                self._write(s, self._flag(me, PROBE + 2 * MAX_TP + q), self._probe_value(me, q, 1))
                cp.cuda.runtime.memcpyAsync(self._flag(q, PROBE + MAX_TP + me), self._flag(me, PROBE + 2 * MAX_TP + q),
                                            4, cp.cuda.runtime.memcpyDeviceToDevice, s.ptr)
            s.synchronize()
        except Exception as e:  # noqa: BLE001
            err = e
        self.world.tp_comm.Barrier()
        if err is None:
            try:
                got = np.zeros(2 * MAX_TP, dtype=np.uint32)
                cp.cuda.runtime.memcpy(got.ctypes.data, self._flag(me, PROBE), got.nbytes,
                                       cp.cuda.runtime.memcpyDeviceToHost)
                for q in peers:
                    for kind, how in ((0, "cuStreamWriteValue32"), (1, "a peer cudaMemcpyAsync")):
                        got_q, want = int(got[kind * MAX_TP + q]), self._probe_value(q, me, kind)
                        if got_q != want:
                            raise CeUnavailable(f"probe word from rank {q} written by {how} reads {got_q:#x}, "
                                                f"expected {want:#x}")
                    self._wait(s, self._flag(me, PROBE + q), self._probe_value(q, me, 0))
                s.synchronize()
            except Exception as e:  # noqa: BLE001
                err = e
        self.buf.agree(err, "the start-up probe (stream write, peer copy, stream wait)")

    def _check_ctas(self, ctas) -> int:
        ctas = int(ctas)
        if not 1 <= ctas <= self.num_sms:
            raise ValueError(f"ctas={ctas} must be in 1..{self.num_sms} (the SM count)")
        return ctas

    def close(self) -> None:
        """Close the peers' IPC mappings (skipped after a CeTimeout: the stream that uses them is blocked)."""
        if not getattr(self, "_broken", None):
            super().close()

    # ------------------------------------------------------------------ buffers
    def _addr(self, rank: int, buf: str, row: int) -> int:
        return self.buf.addr(rank, buf, row * self._row)

    def _flag(self, rank: int, word: int) -> int:
        return self.buf.addr(rank, "flags", 4 * word)

    # ------------------------------------------------------------------ checks
    def _check_rows(self, name: str, x, end: int, registered_ok: bool) -> None:
        check_rows(name, x, end, self.hidden, self.dtype)
        self.buf.region_of(name, x, ("out", "staging") if registered_ok else (),
                           {"out": "output", "staging": "staging"})

    # ------------------------------------------------------------------ calls
    def all_reduce(self, start: int, end: int, stream=None, ctas=None) -> None:
        """staging[start:end] <- sum over TP ranks (bf16 result of fp32 sums in rank order), on every rank."""
        check_range(start, end, self.max_tokens)
        if end > start:
            self._run(start, end, stream, ctas)

    def ar_add_norm(self, start: int, end: int, residual, weight, eps: float, out, stream=None,
                    sharded: bool | None = None, ctas=None) -> None:
        """For rows [start, end): h = sum over ranks of staging + residual; residual <- h on the rows this
        rank owns; out <- RMSNorm(h) * weight on every rank. residual, out: bf16 [>= end, hidden]
        C-contiguous, indexed by absolute row; weight: bf16 [hidden]. out = comm.output(n): no final copy."""
        if sharded is False:
            raise ValueError("ce implements the sharded order only (sharded=False asked for the baseline order)")
        check_range(start, end, self.max_tokens)
        self._check_rows("residual", residual, end, registered_ok=False)
        self._check_rows("out", out, end, registered_ok=True)
        check_norm(weight, eps, self.hidden, self.dtype)
        if end > start:
            self._run(start, end, stream, ctas, (residual, weight, float(eps)), out)

    def _run(self, start, end, stream, ctas, norm=None, out=None) -> None:
        import cupy as cp
        if self._broken:
            raise CeTimeout(f"this CeComm is unusable after: {self._broken}")
        ctas = self.ctas if ctas is None else self._check_ctas(ctas)
        stream = stream or cp.cuda.get_current_stream()
        self._streams[stream.ptr] = stream  # check() bounds it
        self._calls += 1
        streams, ev, rt = {"main": stream, "side": self._side}, self._events, cp.cuda.runtime
        fn = self._fn("ce_reduce_add_norm" if norm else "ce_reduce")
        residual, weight, eps = norm or (None, None, 0.0)
        for op in plan(self.rank, self.tp, start, end, self.chunks, self.chunk_max, norm is not None):
            s, kind = streams[op[0]], op[1]
            if kind == "record":
                ev[op[2]].record(s)
            elif kind == "wait_event":
                s.wait_event(ev[op[2]])
            elif kind == "wait":
                self._wait(s, self._flag(self.rank, op[2]), 1)
            elif kind == "write":
                self._write(s, self._flag(op[2], op[3]), op[4])
            elif kind == "copy":
                _, _, dst, dst_buf, dst_row, src_buf, src_row, rows = op
                rt.memcpyAsync(self._addr(dst, dst_buf, dst_row), self._addr(self.rank, src_buf, src_row),
                               rows * self._row, rt.memcpyDeviceToDevice, s.ptr)
            else:  # kernel on rows [a, b) of my block starting at own_lo
                a, b, own_lo = op[2:]
                args = (np.uint64(self._addr(self.rank, "staging", 0)), np.uint64(self._addr(self.rank, "recv", 0)),
                        np.uint64(residual.data.ptr if norm else 0), np.uint64(weight.data.ptr if norm else 0),
                        np.uint64(self._addr(self.rank, "out", 0)), np.int32(self.rank), np.int32(self.tp),
                        np.int32(self.hidden), np.int32(a), np.int32(b), np.int32(own_lo), np.int32(self.chunk_max),
                        np.float32(eps))
                kernels.launch(fn, min(ctas, -(-(b - a) // (THREADS // 32))), THREADS, args, stream=s)
        if out is not None and out.data.ptr != self._addr(self.rank, "out", 0):
            rt.memcpyAsync(out.data.ptr + start * self._row, self._addr(self.rank, "out", start),
                           (end - start) * self._row, rt.memcpyDeviceToDevice, stream.ptr)

    def _fn(self, name: str):
        if name not in self._fns:  # TP compiled in, as for the P2P kernels (same kStep: bit-identical sums)
            self._fns[name] = kernels.function("ce_norm", name, {"TW_TP": self.tp})
        return self._fns[name]

    def _write(self, s, addr: int, value: int) -> None:  # with the default memory barrier before the write
        driver.check(self._drv.cuStreamWriteValue32(s.ptr, addr, value, self._barrier), "cuStreamWriteValue32")

    def _wait(self, s, addr: int, value: int) -> None:
        driver.check(self._drv.cuStreamWaitValue32(s.ptr, addr, value, self._eq), "cuStreamWaitValue32")

    # ------------------------------------------------------------------ errors
    def check(self) -> None:
        """Wait (at most timeout_s in all) until every stream a call ran on, or a captured call's graph
        replays on, has drained all work issued so far; else raise CeTimeout ("call N": the last call issued,
        graph replays not counted). The blocked stream cannot be cancelled afterwards: the job must end."""
        import cupy as cp
        if self._broken:
            raise CeTimeout(self._broken)
        deadline = time.monotonic() + self.timeout_s
        for s in [self._side, *self._streams.values()]:
            if s.is_capturing():
                raise RuntimeError("CeComm.check() cannot run while a stream it used is being captured")
            done = cp.cuda.Event(disable_timing=True)
            done.record(s)
            while not done.done:
                if time.monotonic() > deadline:
                    peers = [str(q) for q in range(self.tp) if q != self.rank]
                    who = f"rank {peers[0]}" if len(peers) == 1 else f"rank(s) among {', '.join(peers)}"
                    self._broken = (
                        f"{who} did not arrive within {self.timeout_s:g} s (CE transport, "
                        f"call {self._calls}, TP rank {self.rank}): the ranks' call sequences differ (a skipped "
                        "call, another row range) or a rank died. A stream wait cannot be cancelled: this "
                        "process's stream stays blocked and the job must end (raise; tw.dist aborts the job).")
                    raise CeTimeout(self._broken)
                time.sleep(2e-4)
