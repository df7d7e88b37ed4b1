"""Stand-in peers for an emulated rank (tw/comm/emulation.py): the P2P transport's buffer layout, N times,
in distinct allocations on this GPU, with no other process involved.

    buf = StandInBuffer(sizes, tp=8, rank=0, flags="flags")
    buf.addr(r, "recv")          # rank r's region: my own allocation for r == rank, else stand-in r's
    buf.view(r, "recv", shape, dtype)   # a cupy view of it (tests fill and read the stand-ins this way)

It answers the same calls as tw.comm.ipc.SharedBuffer (addr, rows, region_of, agree, close), so
P2PComm runs its unchanged kernels over it. What makes it a loopback and not a hang:
  - this rank's arrival flags (region `flags`) are preset to FLAG_ARRIVED, a value every call's epoch
    compares as reached (the kernels' wrap-safe test (flag - epoch) >= 0 as int32 holds for the first
    2^31 - 1 calls), so every wait ends at its first acquire load: peer arrival is satisfied locally;
  - every region of every allocation is filled once with finite bf16 data (FILL_BITS pattern), so the
    partial sums this rank reads from its receive area are real memory, written before and not cached
    from the kernel's own stores, as a real peer's NVLink writes would be.
Nothing else changes: the kernels still store their signals into the stand-ins' flag words and push
their rows into the stand-ins' receive and output areas.
"""
from __future__ import annotations

from tw.comm.ipc import ALIGN, SharedBuffer

FLAG_ARRIVED = 0x7FFFFFFF


class StandInBuffer(SharedBuffer):
    """One allocation per emulated TP rank, laid out as SharedBuffer lays out one (sizes: region -> bytes).
    flags: the region holding this rank's uint32 arrival flags (preset to FLAG_ARRIVED)."""

    def __init__(self, sizes: dict[str, int], tp: int, rank: int, flags: str, label: str = "P2P (emulated)"):
        import cupy as cp
        self.world, self.unavailable, self.label = None, RuntimeError, label
        self.rank, self.tp = rank, tp
        self.offsets, total = {}, 0
        for name, size in sizes.items():
            self.offsets[name] = total
            total += -(-int(size) // ALIGN) * ALIGN
        self.sizes = dict(sizes)
        self._mems = [cp.cuda.Memory(total) for _ in range(tp)]   # distinct allocations, real size
        self.mem = self._mems[rank]
        self.base, self.size = self.mem.ptr, total
        self.peer_bases = [m.ptr for m in self._mems]
        self._opened = []
        for r in range(tp):
            self.fill(r)
        flag_words = self.view(rank, flags, (self.sizes[flags] // 4,), cp.uint32)
        flag_words.fill(FLAG_ARRIVED)
        cp.cuda.Device().synchronize()

    def fill(self, rank: int) -> None:
        """Fill all of `rank`'s allocation with finite bf16 values in [1/128, 1/32): a fixed pattern, so
        an emulated pass reads data, never NaN or uninitialized memory."""
        import cupy as cp
        words = self.view(rank, None, (self.size // 2,), cp.uint16)
        words[...] = (cp.arange(words.size, dtype=cp.uint32) % 256).astype(cp.uint16) + FILL_BITS

    def view(self, rank: int, name: str | None, shape: tuple, dtype):
        """A cupy array of `shape` and `dtype` at region `name` (None: the allocation's start) of `rank`."""
        import cupy as cp
        off = 0 if name is None else self.offsets[name]
        return cp.ndarray(shape, dtype=dtype, memptr=cp.cuda.MemoryPointer(self._mems[rank], off))

    def agree(self, err, what: str) -> None:
        """One process: nobody to agree with; an error is raised as it is."""
        if err is not None:
            raise err

    def close(self) -> None:
        """Nothing mapped from other processes; the allocations go with the object."""


FILL_BITS = 0x3C00   # bf16 0x3C00 = 2^-7: the fill pattern's smallest value
