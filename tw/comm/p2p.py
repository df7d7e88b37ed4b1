"""P2P transport: CUDA-IPC peer pointers and push-based kernels (cuda/ar_norm_p2p.cu).

Each TP rank allocates ONE device buffer at start and shares it with its peers by CUDA IPC; inside it:

    staging  # [max_tokens, hidden] bf16: row-parallel GEMMs write their partial output here
    recv     # [tp, ceil(max_tokens / tp), hidden]: peers push their partials of my rows here
    out      # [max_tokens, hidden]: registered output; passing `comm.output(n)` as `out` lets the
             #   owners push normalized rows straight into it (no local copy at the end)
    oneshot  # [2, tp, oneshot_max_tokens, hidden] + [2, oneshot_max_tokens, hidden]: latency path
    flags    # [2 phases, 256 CTAs, 8 ranks] uint32 arrival epochs, written by the peers

The call counter (epoch) lives on the device, so calls have no host-side state and CUDA-graph replay
works. All calls of one P2PComm must run in the same order, with the same ranges and CTA counts, on
every rank, and be stream-ordered on each rank (one stream, or events between streams): the kernels'
buffer-reuse argument depends on it (see the header of cuda/ar_norm_p2p.cu). A rank that does not
arrive makes the others' kernels time out (`timeout_s`) and return; `check()` then raises.

    comm = P2PComm(world, hidden=8192, max_tokens=16384)
    x = comm.staging(n)                        # GEMM output goes here
    comm.ar_add_norm(0, n, residual, weight, 1e-6, out=comm.output(n), stream=s)
"""
from __future__ import annotations

import os

import numpy as np

from tw.comm import check_range
from tw.comm.ipc import SharedBuffer, check_norm, check_rows
from tw.comm.layout import MAX_CTAS, MAX_TP, NUM_SLOTS, SLOT_NAMES, THREADS
from tw.comm.peer import PeerComm
from tw.comm.standin import StandInBuffer
from tw.runtime import kernels
from tw.runtime.dist import env_flag


def options_from_env() -> dict:
    """P2PComm's build options as the environment switches them, {"cluster": ..., "runtime_tp": ...}: the one
    place that reads them (a run reads them once and passes them on). TW_P2P_CLUSTER: CTAs per thread-block
    cluster of the kernels, 1 (plain launch, the default) or 2 (the kernel takes its SMs in pairs within a
    GPC; CTA budgets must then be even). TW_P2P_RUNTIME_TP=1: TP read at run time, not compiled in."""
    raw = os.environ.get("TW_P2P_CLUSTER", "1").strip() or "1"
    if raw not in ("1", "2"):
        raise ValueError(f"TW_P2P_CLUSTER={raw!r}: expected 1 (plain launch) or 2 (2-CTA clusters)")
    return {"cluster": int(raw), "runtime_tp": env_flag("TW_P2P_RUNTIME_TP")}


def kernel_defines(tp: int, cluster: int = 1, runtime_tp: bool = False) -> dict | None:
    """The -D defines P2PComm compiles cuda/ar_norm_p2p.cu with for TP degree `tp`: TP as a
    compile-time constant (loops over ranks unroll), or none (TP read at run time) with runtime_tp;
    TW_CLUSTER for clusters of `cluster` CTAs. The layout constants are not defines: they come from
    cuda/peer_layout.cuh."""
    defines = {} if runtime_tp else {"TW_TP": int(tp)}
    if cluster > 1:
        defines["TW_CLUSTER"] = cluster
    return defines or None


DEFAULT_CTAS = 8      # the CTA budget when none is given (8 CTAs push ~338 GB/s with plain stores,
                      # the fused kernel moves 166-176 GB/s at 8 CTAs: docs/hardware.md#measured)
DEFAULT_ONESHOT_MAX_TOKENS = 256

OUT_PRIVATE, OUT_STAGING, OUT_REGISTERED = 0, 1, 2


class P2PUnavailable(RuntimeError):
    """Peer-to-peer access between the TP ranks' GPUs does not work (decided by all ranks together)."""


class P2PTimeout(RuntimeError):
    """A peer did not arrive at a P2P kernel in time; the P2PComm is unusable afterwards."""


class P2PComm(PeerComm):
    """Fused AllReduce + residual-add + RMSNorm and plain collectives over CUDA-IPC peer pointers.

    world: tw.runtime.dist.World on GPUs; hidden: row width (a multiple of 8); max_tokens: rows of the
    staging buffer. ctas: default CTA budget per call (1..SM count, the same on every rank).
    oneshot_max_tokens: calls with at most this many rows take the one-shot latency path.
    timeout_s: how long a kernel waits for a peer before it gives up and flags an error.
    emulate: a tw.comm.emulation.Emulation: this one process plays rank emulate.rank of TP=emulate.tp over
    stand-in peers (tw/comm/standin.py) instead of an MPI TP group; the kernels are the same.
    pull: the fused two-shot call reads its rows' partials from the peers' staging (p2p_ar_norm_pull)
    instead of having them pushed into its receive area: the same result, about half the bytes through
    this rank's SMs.
    cluster, runtime_tp: how the kernels are built (kernel_defines; options_from_env reads the switches).
    """

    name = "p2p"

    def __init__(self, world, hidden: int, max_tokens: int, dtype: str = "bfloat16", *, sharded: bool = True,
                 ctas: int | None = None, oneshot_max_tokens: int = DEFAULT_ONESHOT_MAX_TOKENS,
                 timeout_s: float = 10.0, emulate=None, pull: bool = False, cluster: int = 1,
                 runtime_tp: bool = False):
        import cupy as cp
        if not world.is_gpu:
            raise P2PUnavailable("P2PComm needs GPUs; this world runs on the CPU")
        self.check_args(hidden, max_tokens, dtype)
        self.emulate, self.pull = emulate, bool(pull)
        if emulate is not None and world.tp_size != 1:
            raise ValueError(f"an emulated rank runs alone: the world has TP={world.tp_size}, expected 1")
        self.rank, self.tp = (emulate.rank, emulate.tp) if emulate is not None else (world.tp_rank, world.tp_size)
        if self.tp > MAX_TP:
            raise ValueError(f"P2PComm supports TP <= {MAX_TP}, got {self.tp}")
        self.world, self.hidden, self.max_tokens = world, hidden, max_tokens
        self.sharded = bool(sharded)
        self.dtype = cp.dtype("bfloat16")
        self.num_sms = world.sm_count
        if cluster not in (1, 2):
            raise ValueError(f"cluster={cluster!r}: expected 1 (plain launch) or 2 (2-CTA clusters)")
        self.cluster, self.runtime_tp = int(cluster), bool(runtime_tp)   # how the kernels are built
        self.ctas = self._check_ctas(ctas or min(DEFAULT_CTAS, self.num_sms))
        self.oneshot_max_tokens = max(0, min(int(oneshot_max_tokens), max_tokens))
        self.timeout_s = float(timeout_s)
        self.chunk_max = -(-max_tokens // self.tp)
        self._fns = {}

        # ---- one allocation, laid out as in the module docstring, shared with the peers ----
        row = hidden * 2
        osm = max(1, self.oneshot_max_tokens)
        sizes = {"staging": max_tokens * row, "recv": self.tp * self.chunk_max * row,
                 "out": max_tokens * row, "osum": 2 * self.tp * osm * row, "ores": 2 * osm * row,
                 "flags": 2 * MAX_CTAS * MAX_TP * 4, "probe": MAX_TP * 4}
        self._state = cp.zeros(8, dtype=cp.uint32)  # [epoch, ctas done, error, peer, cta, phase]
        if emulate is not None:
            self.buf = StandInBuffer(sizes, self.tp, self.rank, flags="flags")
        else:
            self.buf = SharedBuffer(world, sizes, P2PUnavailable, "P2P")
        table = np.zeros(self.tp * NUM_SLOTS, dtype=np.uint64)
        for r in range(self.tp):
            for k, name in enumerate(SLOT_NAMES):
                table[r * NUM_SLOTS + k] = self.buf.addr(r, name)
        self._table = cp.asarray(table)
        if emulate is None:  # stand-ins have nobody to probe: their pointers are this process's own
            self._probe()

    # ------------------------------------------------------------------ set-up helpers
    def _probe(self) -> None:
        """Every rank stores a value into every peer's probe word with a real kernel store over the
        peer pointer, then reads back its own words and the peers' copies of its value."""
        import cupy as cp
        err = None
        try:
            fn = self._fn("p2p_probe")
            for r in range(self.tp):
                if r != self.rank:
                    remote = self.buf.addr(r, "probe", 4 * self.rank)
                    kernels.launch(fn, 1, 32, (np.uint64(remote), np.uint32(self._probe_value(self.rank, r))))
            cp.cuda.Device().synchronize()
        except Exception as e:  # noqa: BLE001
            err = e
        self.world.tp_comm.Barrier()
        if err is None:
            try:
                got = np.zeros(MAX_TP, dtype=np.uint32)
                cp.cuda.runtime.memcpy(got.ctypes.data, self.buf.addr(self.rank, "probe"), got.nbytes,
                                       cp.cuda.runtime.memcpyDeviceToHost)
                back = np.zeros(1, dtype=np.uint32)
                for r in range(self.tp):
                    if r == self.rank:
                        continue
                    if got[r] != self._probe_value(r, self.rank):
                        raise P2PUnavailable(f"probe word from rank {r} reads {got[r]:#x}, "
                                             f"expected {self._probe_value(r, self.rank):#x}")
                    cp.cuda.runtime.memcpy(back.ctypes.data, self.buf.addr(r, "probe", 4 * self.rank),
                                           4, cp.cuda.runtime.memcpyDeviceToHost)
                    if back[0] != self._probe_value(self.rank, r):
                        raise P2PUnavailable(f"reading back my probe word on rank {r} gave {back[0]:#x}")
            except Exception as e:  # noqa: BLE001
                err = e
        self.buf.agree(err, "the start-up probe (remote store + read back)")

    @staticmethod
    def _probe_value(src: int, dst: int) -> int:
        return 0x7E000000 | (src << 8) | dst

    def _fn(self, name: str):
        if name not in self._fns:
            # TP compiled in as a constant (loops over ranks unroll; see cuda/ar_norm_p2p.cu);
            # runtime_tp builds the variant that reads TP at run time instead.
            self._fns[name] = kernels.function("ar_norm_p2p", name,
                                               kernel_defines(self.tp, self.cluster, self.runtime_tp))
        return self._fns[name]

    def _check_ctas(self, ctas) -> int:
        ctas = int(ctas)
        limit = min(self.num_sms, MAX_CTAS)
        if not 1 <= ctas <= limit:
            raise ValueError(f"ctas={ctas} must be in 1..{limit} (the SM count): every CTA must be "
                             "resident at once, because CTAs wait for their partners on the peers")
        if ctas % self.cluster:
            raise ValueError(f"ctas={ctas} must be a multiple of {self.cluster}: the P2P kernels launch "
                             f"{self.cluster}-CTA clusters (cluster={self.cluster}, TW_P2P_CLUSTER)")
        return ctas

    # ------------------------------------------------------------------ buffers
    def region(self, rank: int, name: str):
        """Rank `rank`'s region `name` as this process maps it: staging / out [max_tokens, hidden], recv
        [tp, chunk_max, hidden]. Under emulation, the stand-in peers' memory (tests fill and read it)."""
        import cupy as cp
        shape = {"staging": (self.max_tokens, self.hidden), "out": (self.max_tokens, self.hidden),
                 "recv": (self.tp, self.chunk_max, self.hidden)}[name]
        if rank != self.rank and self.emulate is None:
            raise ValueError("a real peer's memory is not exposed; only stand-ins (emulate=...) are")
        return cp.ndarray(shape, dtype=self.dtype, memptr=cp.cuda.MemoryPointer(
            self.buf.mem if rank == self.rank else self.buf._mems[rank], self.buf.offsets[name]))

    # ------------------------------------------------------------------ checks
    def _check_range(self, start: int, end: int) -> None:
        check_range(start, end, self.max_tokens)

    def _check_rows_array(self, name: str, x, end: int) -> None:
        check_rows(name, x, end, self.hidden, self.dtype)

    def _out_kind(self, out, what: str = "out") -> int:
        region = self.buf.region_of(what, out, ("staging", "out"), {"staging": "staging", "out": "output"})
        return {None: OUT_PRIVATE, "staging": OUT_STAGING, "out": OUT_REGISTERED}[region]

    # ------------------------------------------------------------------ launches
    def _launch(self, op: str, start: int, end: int, stream, ctas, residual=None, weight=None, eps=0.0,
                out=None, out_kind=OUT_STAGING, sync_all=False) -> None:
        ctas = self.ctas if ctas is None else self._check_ctas(ctas)
        fn = self._fn(f"p2p_{op}")
        null = np.uint64(0)
        args = (self._table, np.int32(self.rank), np.int32(self.tp), np.int32(self.hidden),
                np.int32(start), np.int32(end), np.int32(self.chunk_max),
                np.int32(max(1, self.oneshot_max_tokens)),
                residual if residual is not None else null, weight if weight is not None else null,
                np.float32(eps), out if out is not None else null, np.int32(out_kind), np.int32(bool(sync_all)),
                np.uint64(int(self.timeout_s * 1e9)), self._state, np.uint64(self._link_ns(op, start, end)))
        kernels.launch(fn, ctas, THREADS, args, stream=stream)

    def _link_ns(self, op: str, start: int, end: int) -> int:
        """Emulated link floor of one phase (cuda/ar_norm_p2p.cu link_floor): the ns a link of
        emulate.link_gbps GB/s per direction needs for the rows one phase sends each way, (tp - 1) x
        ceil(n / tp) (two-shot) or (tp - 1) x n (one-shot). 0 without an emulated link."""
        gbps = getattr(self.emulate, "link_gbps", None)
        if not gbps:
            return 0
        n = end - start
        rows = (self.tp - 1) * (n if op.startswith("oneshot") else -(-n // self.tp))
        return int(rows * self.hidden * 2 / gbps)   # bytes / (GB/s) = ns

    def _oneshot(self, start: int, end: int, oneshot) -> bool:
        if oneshot is None:
            return end - start <= self.oneshot_max_tokens
        if oneshot and end - start > self.oneshot_max_tokens:
            raise ValueError(f"oneshot=True needs end - start <= oneshot_max_tokens={self.oneshot_max_tokens}, "
                             f"got {end - start} rows")
        return bool(oneshot)

    def all_reduce(self, start: int, end: int, stream=None, ctas=None, *, oneshot=None) -> None:
        """staging[start:end] <- sum over TP ranks, on every rank (bf16 result, fp32 sums)."""
        self._check_range(start, end)
        if end > start:
            op = "oneshot_all_reduce" if self._oneshot(start, end, oneshot) else "all_reduce"
            self._launch(op, start, end, stream, ctas)

    def reduce_scatter(self, start: int, end: int, stream=None, ctas=None) -> None:
        """staging[owned rows] <- sum over TP ranks; other rows untouched (owned_rows defines them)."""
        self._check_range(start, end)
        if end > start:
            self._launch("reduce_scatter", start, end, stream, ctas)

    def all_gather(self, start: int, end: int, stream=None, ctas=None) -> None:
        """staging[owned rows of q] on every rank <- staging[owned rows of q] on rank q, for every q."""
        self._check_range(start, end)
        if end > start:
            self._launch("all_gather", start, end, stream, ctas)

    def ar_add_norm(self, start: int, end: int, residual, weight, eps: float, out, stream=None,
                    sharded: bool | None = None, ctas=None, *, oneshot=None, sync_all: bool = False) -> None:
        """For rows [start, end): h = sum over ranks of staging + residual; residual <- h (sharded:
        the rows this rank owns; the one-shot path and sharded=False: every row); out <- RMSNorm(h) *
        weight on every rank. residual, out: bf16 [>= end, hidden] C-contiguous, indexed by absolute
        row; weight: bf16 [hidden]. `out` may be comm.output(n) (zero-copy) or comm.staging(n)
        (in place). oneshot: None = by size; sync_all: wait for all peer CTAs between phases (the
        simple three-phase fusion, for comparison)."""
        self._check_range(start, end)
        self._check_rows_array("residual", residual, end)
        self._check_rows_array("out", out, end)
        check_norm(weight, eps, self.hidden, self.dtype)
        out_kind = self._out_kind(out)
        if self._out_kind(residual, "residual") != OUT_PRIVATE:
            raise ValueError("residual must not live in the P2PComm's registered buffers")
        if end == start:
            return
        if self._oneshot(start, end, oneshot):
            op = "oneshot_ar_norm"
        elif self.sharded if sharded is None else sharded:
            op = "ar_norm_pull" if self.pull else "ar_norm"
            comm_mode = getattr(self.emulate, "comm", "full")
            if comm_mode == "none":   # decomposition runs of an emulated rank (tw/comm/emulation.py)
                return
            if comm_mode == "norm":
                op = "norm_only"
        else:
            op = "ar_norm_replicated"
            if out_kind == OUT_STAGING:
                raise ValueError("sharded=False keeps the all-reduced sums in staging; pass another out")
        self._launch(op, start, end, stream, ctas, residual, weight, eps, out, out_kind, sync_all)

    # ------------------------------------------------------------------ errors
    def error(self) -> dict | None:
        """The device error record after synchronizing the device, or None."""
        import cupy as cp
        cp.cuda.Device().synchronize()
        st = self._state.get()
        if st[2] == 0:
            return None
        return {"peer": int(st[3]), "cta": int(st[4]), "phase": int(st[5])}

    def check(self) -> None:
        """Raise P2PTimeout if a kernel gave up waiting for a peer (synchronizes the device)."""
        e = self.error()
        if e is not None:
            raise P2PTimeout(
                f"rank {e['peer']} did not arrive within {self.timeout_s:g} s (TP rank {self.rank}, CTA {e['cta']}, "
                f"phase {e['phase'] + 1} of a P2P kernel): the ranks' call sequences differ (a skipped call, "
                "another CTA count or row range) or that rank died. This P2PComm is unusable now; make a new one.")
