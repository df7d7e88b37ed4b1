"""One device allocation per TP rank, shared with its peers by CUDA IPC, and the checks on the arrays a
peer transport's calls take: what the P2P (p2p.py) and copy-engine (ce.py) transports have in common.

    buf = SharedBuffer(world, {"staging": n0, "recv": n1, ...}, P2PUnavailable, "P2P")
    buf.addr(rank, "recv", byte_offset)   # rank's buffer as mapped in this process
    buf.rows("staging", num_tokens, hidden, dtype)   # a view of my own buffer

The named regions are laid out in order, each 256-byte aligned, in ONE plain cudaMalloc (IPC handles
name the allocation base), zeroed before any peer can open it. Peer access is checked, the handles are
exchanged with allgather, and the peers' handles opened; any failure on any rank raises `unavailable` on
every rank (the ranks agree by an allreduce), so either all ranks get the transport or all fall back.
Ranks sharing one GPU (TW_SHARE_GPU=1): cudaDeviceCanAccessPeer(d, d) is 0, yet IPC works across
processes, so the same device is accepted.
"""
from __future__ import annotations

ALIGN = 256


class SharedBuffer:
    """sizes: region name -> bytes. unavailable: the exception class raised (collectively) when the
    buffer cannot be shared; label: how its message names the transport. prior_error: a failure this
    rank met before (e.g. a missing binding), reported collectively here like the buffer's own."""

    def __init__(self, world, sizes: dict[str, int], unavailable: type[Exception], label: str,
                 prior_error: Exception | None = None):
        import cupy as cp
        self.world, self.unavailable, self.label = world, unavailable, label
        self.rank, self.tp = world.tp_rank, world.tp_size
        self.offsets, total = {}, 0
        for name, size in sizes.items():
            self.offsets[name] = total
            total += -(-int(size) // ALIGN) * ALIGN
        self.sizes = dict(sizes)
        self.mem = cp.cuda.Memory(total)
        self.base, self.size = self.mem.ptr, total
        cp.cuda.runtime.memset(self.base, 0, total)
        cp.cuda.Device().synchronize()  # zeroed (flags at 0) before any peer can open it
        self._opened = []
        err, handle, dev = prior_error, None, cp.cuda.Device().id
        devices = world.tp_comm.allgather(dev)
        if err is None:
            try:
                for r, d in enumerate(devices):
                    if r != self.rank and d != dev and not cp.cuda.runtime.deviceCanAccessPeer(dev, d):
                        raise unavailable(f"GPU {dev} cannot access GPU {d} (cudaDeviceCanAccessPeer = 0)")
                handle = cp.cuda.runtime.ipcGetMemHandle(self.base)
            except Exception as e:  # noqa: BLE001 - reported collectively below
                err = e
        handles = world.tp_comm.allgather(handle)
        bases = [0] * self.tp
        if err is None and all(h is not None for h in handles):
            try:
                for r, h in enumerate(handles):
                    bases[r] = self.base if r == self.rank else cp.cuda.runtime.ipcOpenMemHandle(h)
                    if r != self.rank:
                        self._opened.append(bases[r])
            except Exception as e:  # noqa: BLE001
                err = e
        self.agree(err, "opening the peers' CUDA IPC handles")
        self.peer_bases = bases

    def agree(self, err, what: str) -> None:
        """Raise `unavailable` on every rank if any rank met an error (err: this rank's, or None)."""
        from mpi4py import MPI
        if self.world.tp_comm.allreduce(err is not None, op=MPI.LOR):
            self.close()
            detail = f"{type(err).__name__}: {err}" if err is not None else "failed on another rank"
            raise self.unavailable(f"{self.label} between the TP ranks does not work ({what}): {detail}")

    def addr(self, rank: int, name: str, byte_offset: int = 0) -> int:
        """Device address of region `name` of `rank`'s buffer (this process's mapping), plus byte_offset."""
        return self.peer_bases[rank] + self.offsets[name] + byte_offset

    def rows(self, name: str, num_tokens: int, hidden: int, dtype, max_tokens: int):
        """[num_tokens, hidden] view of my region `name` (rows of `hidden` elements of `dtype`)."""
        import cupy as cp
        if not 0 <= num_tokens <= max_tokens:
            raise ValueError(f"num_tokens={num_tokens} must be in 0..max_tokens={max_tokens}")
        return cp.ndarray((num_tokens, hidden), dtype=dtype,
                          memptr=cp.cuda.MemoryPointer(self.mem, self.offsets[name]))

    def region_of(self, what: str, x, names: tuple[str, ...], accessor: dict[str, str]) -> str | None:
        """The region of `names` that array x (the argument `what`) starts exactly at, or None if x lies
        outside the buffer. Raises if x overlaps a region without starting at it, or any other region."""
        ptr, nbytes = x.data.ptr, x.nbytes
        for name in names:
            lo = self.base + self.offsets[name]
            if ptr == lo:
                return name
            if ptr < lo + self.sizes[name] and lo < ptr + nbytes:
                raise ValueError(f"{what} overlaps the registered {name} buffer but does not start at its "
                                 f"row 0; pass comm.{accessor[name]}(n) itself")
        if ptr < self.base + self.size and self.base < ptr + nbytes:
            raise ValueError(f"{what} overlaps the {self.label} transport's internal buffers")
        return None

    def close(self) -> None:
        """Close the peers' IPC mappings (best effort; idempotent)."""
        import cupy as cp
        for p in self._opened:
            try:
                cp.cuda.runtime.ipcCloseMemHandle(p)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        self._opened = []


def check_rows(name: str, x, end: int, hidden: int, dtype) -> None:
    """x must be a C-contiguous, 16-byte aligned cupy array of `dtype`, [>= end, hidden] (rows are
    indexed absolutely): what the kernels read and write as 16-byte vectors at a fixed stride."""
    import cupy as cp
    if not isinstance(x, cp.ndarray):
        raise TypeError(f"{name} must be a cupy array, got {type(x).__name__}")
    if x.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != hidden or x.shape[0] < end:
        raise ValueError(f"{name} must be [>= {end}, {hidden}] (rows are indexed absolutely), got {tuple(x.shape)}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (the kernel reads rows at a fixed stride)")
    if x.data.ptr % 16:
        raise ValueError(f"{name} must be 16-byte aligned (pointer {x.data.ptr:#x}); the kernels move 16-byte vectors")


def check_norm(weight, eps, hidden: int, dtype) -> None:
    """The norm's weight ([hidden] of dtype, C-contiguous, 16-byte aligned) and eps (> 0)."""
    import cupy as cp
    if not isinstance(weight, cp.ndarray) or weight.dtype != dtype or weight.shape != (hidden,):
        raise ValueError(f"weight must be a {dtype} cupy array of shape ({hidden},), got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)} {getattr(weight, 'shape', '')}")
    if not weight.flags.c_contiguous or weight.data.ptr % 16:
        raise ValueError("weight must be C-contiguous and 16-byte aligned")
    if not float(eps) > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
