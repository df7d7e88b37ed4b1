"""Multimem (NVLS multicast) transport: the paper's fused AllReduce + add + RMSNorm kernel
(cuda/ar_norm_multimem.cu). WRITTEN AND COMPILED, NEVER RUN on the lab machines.

docs/design.md#rules, Rule 1: creating an NVLink multicast object on the lab's shared NVSwitch hosts can take the
host's GPUs out of service for a day. So `MultimemComm(...)` first calls `check_multicast_allowed()`,
which refuses unless TW_ALLOW_MULTICAST=1 is set AND none of NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 is present. The check runs before this
module imports cuda-bindings or CuPy or makes any driver call; nothing at import time touches a GPU.

Set-up (only when allowed): rank 0 creates the multicast object (cuMulticastCreate) and exports it as
a POSIX file descriptor; the peers fetch that descriptor with pidfd_getfd and import it; every rank
adds its device (cuMulticastAddDevice), allocates physical memory (cuMemCreate), binds it
(cuMulticastBindMem), and maps both its unicast memory and the multicast address range.
"""
from __future__ import annotations

import ctypes
import os

from tw.runtime import driver

# Row ownership follows tw.comm.owned_rows, as for every transport.

FORBIDDING_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _vpt_threads(hidden: int) -> tuple[int, int]:
    """(16-byte vectors per thread per row, threads per block): the multimem kernel holds a whole row
    in one CTA's registers, 1, 2 or 4 vectors per thread, at most 512 threads (hidden <= 16384)."""
    h8 = hidden // 8
    for vpt in (1, 2, 4):
        per_thread = -(-h8 // vpt)  # threads needed
        if per_thread <= 512:
            return vpt, -(-per_thread // 32) * 32
    raise ValueError(f"hidden={hidden} is larger than the multimem kernel supports (16384)")


class MulticastRefused(RuntimeError):
    """Multicast is not allowed in this environment (see docs/design.md#rules, Rule 1)."""


def check_multicast_allowed(env=None) -> None:
    """Raise MulticastRefused unless multicast is explicitly allowed. Pure: reads `env` only."""
    env = os.environ if env is None else env
    if env.get("TW_ALLOW_MULTICAST", "").strip() != "1":
        raise MulticastRefused(
            "MultimemComm refuses to create an NVLink multicast object: set TW_ALLOW_MULTICAST=1 to opt in, "
            "and only on a machine you own (never on the lab's shared GPU hosts, docs/design.md#rules, Rule 1). "
            "Use the 'p2p' or 'nccl' transport instead.")
    present = [f"{k}={env[k]}" for k, v in FORBIDDING_ENV.items() if k in env and env[k].strip() == v]
    if present:
        raise MulticastRefused(
            f"MultimemComm refuses: {', '.join(present)} forbids NVLink multicast on this machine "
            "(TW_ALLOW_MULTICAST=1 does not override it). Use the 'p2p' or 'nccl' transport.")


def _pidfd_getfd(pid: int, fd: int) -> int:
    """Duplicate descriptor `fd` of process `pid` into this process (Linux >= 5.6)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        new = libc.syscall(438, pidfd, fd, 0)  # SYS_pidfd_getfd
        if new < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd failed (needs ptrace permission over the peer)")
        return new
    finally:
        os.close(pidfd)


class MultimemComm:
    """ar_add_norm over a multicast-bound staging buffer (sharded order only). Refuses unless allowed."""

    name = "multimem"

    def __init__(self, world, hidden: int, max_tokens: int, dtype: str = "bfloat16", *, sharded: bool = True,
                 ctas: int = 8, timeout_s: float = 10.0):
        check_multicast_allowed()  # FIRST: before any import of cuda-bindings/CuPy or driver call
        if not sharded:
            raise ValueError("MultimemComm implements the sharded order only (sharded=True)")
        self.sharded = True
        import cupy as cp
        drv = driver.api()
        if str(dtype) != "bfloat16" or hidden % 8 or hidden > 16384:
            raise ValueError(f"MultimemComm needs bf16 and hidden % 8 == 0, hidden <= 16384; got {dtype}, {hidden}")
        self.world, self.hidden, self.max_tokens, self.ctas = world, hidden, max_tokens, int(ctas)
        self.rank, self.tp, self.timeout_s = world.tp_rank, world.tp_size, float(timeout_s)
        self.dtype = cp.dtype("bfloat16")
        dev = driver.check(drv.cuDeviceGet(world.device_id))
        if not driver.check(drv.cuDeviceGetAttribute(drv.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTICAST_SUPPORTED, dev)):
            raise RuntimeError("this GPU does not support multicast objects")
        handle_type = drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR

        rows = max_tokens * hidden * 2
        pad = 2 * 256 * 4
        prop = drv.CUmulticastObjectProp()
        prop.numDevices = self.tp
        prop.handleTypes = handle_type
        gran = driver.check(drv.cuMulticastGetGranularity(prop, drv.CUmulticastGranularity_flags.CU_MULTICAST_GRANULARITY_RECOMMENDED))
        self._off_out = -(-rows // gran) * gran
        self._off_pad = self._off_out + -(-rows // gran) * gran
        self.size = self._off_pad + -(-pad // gran) * gran
        prop.size = self.size

        # The multicast object: created on rank 0, shared as a file descriptor.
        if self.rank == 0:
            mc = driver.check(drv.cuMulticastCreate(prop))
            fd = driver.check(drv.cuMemExportToShareableHandle(mc, handle_type, 0))
            info = (os.getpid(), int(fd))
        else:
            info = None
        pid, fd = world.tp_comm.bcast(info, root=0)
        if self.rank != 0:
            local_fd = _pidfd_getfd(pid, fd)
            mc = driver.check(drv.cuMemImportFromShareableHandle(local_fd, handle_type))
            os.close(local_fd)
        driver.check(drv.cuMulticastAddDevice(mc, dev))
        world.tp_comm.Barrier()  # every device added before anyone binds

        # This rank's physical memory, bound into the multicast object and mapped twice.
        aprop = drv.CUmemAllocationProp()
        aprop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        aprop.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        aprop.location.id = world.device_id
        aprop.requestedHandleTypes = handle_type
        mem = driver.check(drv.cuMemCreate(self.size, aprop, 0))
        driver.check(drv.cuMulticastBindMem(mc, 0, mem, 0, self.size, 0))
        access = drv.CUmemAccessDesc()
        access.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = world.device_id
        access.flags = drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self.uc = driver.check(drv.cuMemAddressReserve(self.size, gran, 0, 0))
        driver.check(drv.cuMemMap(self.uc, self.size, 0, mem, 0))
        driver.check(drv.cuMemSetAccess(self.uc, self.size, [access], 1))
        self.mc = driver.check(drv.cuMemAddressReserve(self.size, gran, 0, 0))
        driver.check(drv.cuMemMap(self.mc, self.size, 0, mc, 0))
        driver.check(drv.cuMemSetAccess(self.mc, self.size, [access], 1))
        driver.check(drv.cuMemsetD8(int(self.uc) + self._off_pad, 0, pad))
        driver.check(drv.cuCtxSynchronize())
        world.tp_comm.Barrier()
        self._mem, self._mc_handle = mem, mc
        self._state = cp.zeros(8, dtype=cp.uint32)
        self.vpt, self.threads = _vpt_threads(hidden)

    def staging(self, num_tokens: int):
        import cupy as cp
        mem = cp.cuda.UnownedMemory(int(self.uc), self.size, self)
        return cp.ndarray((num_tokens, self.hidden), self.dtype, cp.cuda.MemoryPointer(mem, 0))

    def output(self, num_tokens: int):
        import cupy as cp
        mem = cp.cuda.UnownedMemory(int(self.uc), self.size, self)
        return cp.ndarray((num_tokens, self.hidden), self.dtype, cp.cuda.MemoryPointer(mem, self._off_out))

    def ar_add_norm(self, start, end, residual, weight, eps, out=None, stream=None, sharded=None, ctas=None):
        """The sharded fused kernel; the result lands in self.output(end) on every rank (out must be
        that buffer or None). ctas must equal the constructor's (the signal pads count per CTA)."""
        import numpy as np
        from tw.runtime import kernels
        if sharded is False:
            raise ValueError("MultimemComm implements the sharded order only")
        if ctas not in (None, self.ctas):
            raise ValueError(f"MultimemComm uses a fixed CTA count ({self.ctas}) for all its calls")
        if out is not None and out.data.ptr != int(self.uc) + self._off_out:
            raise ValueError("MultimemComm writes into comm.output(n); pass that as out (or None)")
        if not 0 <= start <= end <= self.max_tokens:
            raise ValueError(f"bad row range [{start}, {end}) for max_tokens={self.max_tokens}")
        fn = kernels.function("ar_norm_multimem", f"multimem_ar_norm_v{self.vpt}")
        pad = int(self.uc) + self._off_pad
        args = (np.uint64(int(self.mc)), np.uint64(int(self.mc) + self._off_out), np.uint64(int(self.mc) + self._off_pad),
                np.uint64(pad), np.int32(self.rank), np.int32(self.tp), np.int32(self.hidden), np.int32(start),
                np.int32(end), residual, weight, np.float32(eps), np.uint64(int(self.timeout_s * 1e9)), self._state)
        kernels.launch(fn, self.ctas, self.threads, args, stream=stream)

    def check(self) -> None:
        import cupy as cp
        cp.cuda.Device().synchronize()
        st = self._state.get()
        if st[2]:
            raise RuntimeError(f"a peer did not arrive within {self.timeout_s:g} s at the multimem barrier "
                               f"(CTA {st[4]}, phase {st[5] + 1}); this MultimemComm is unusable now")

    def close(self) -> None:
        """The multicast mappings live until the process ends (never created on the lab machines)."""
