"""A table shared by the ranks of one node: one fixed-size record per local rank (its step counter,
heartbeat, state, step name and source location) in a file mapped by every rank and unlinked as soon as
all of them have it open, so nothing is left behind, not even after kill -9. tw/runtime/watchdog.py publishes
into it and reads its peers from it; a record is written seqlock-style (odd sequence number while being
written), so a reader never sees half of one.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import struct
import tempfile
import time

# One record per local rank: seq (odd while being written), step counter, heartbeat, time the current
# step (or idleness) began, world rank, state, pid, step name, source location of the main thread.
_REC = struct.Struct("<qqddiii100s124s")
_HEADER = 64  # int32 at offset 0: 1 + local rank of the watchdog that reports (0: nobody yet)
UNWRITTEN, IDLE, IN_STEP, STOPPED = 0, 1, 2, 3


class RankTable:
    """The node's shared table: one fixed-size record per local rank in a mapped, already unlinked file."""

    def __init__(self, fd: int, nslots: int, slot: int):
        self.fd, self.nslots, self.slot = fd, nslots, slot
        self.map = mmap.mmap(fd, _HEADER + nslots * _REC.size)
        self._seq = 0

    @classmethod
    def open_shared(cls, local_comm) -> "RankTable | None":
        """Collective over `local_comm`: local rank 0 makes the file, every rank maps it, then it is unlinked."""
        rank, size = local_comm.Get_rank(), local_comm.Get_size()
        path = None
        if rank == 0:
            job = next((os.environ[k] for k in ("PMI_JOBID", "SLURM_JOB_ID", "OMPI_MCA_ess_base_jobid", "PBS_JOBID")
                        if os.environ.get(k)), "nojob")
            name = f"tw-watchdog-{''.join(c if c.isalnum() else '_' for c in job)}-{os.getpid()}-{time.time_ns()}"
            for folder in ("/dev/shm", tempfile.gettempdir()):
                try:
                    candidate = os.path.join(folder, name)
                    fd = os.open(candidate, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                    os.ftruncate(fd, _HEADER + size * _REC.size)
                    os.close(fd)
                    path = candidate
                    break
                except OSError:
                    continue
        path = local_comm.bcast(path, root=0)
        table = None
        if path is not None:
            try:
                table = cls(os.open(path, os.O_RDWR), size, rank)
            except OSError:
                table = None
        local_comm.Barrier()  # every rank has it open (or gave up): nothing needs the name any more
        if rank == 0 and path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass
        return table

    def write(self, counter, heartbeat, since, world_rank, state, name, where) -> None:
        off = _HEADER + self.slot * _REC.size
        self._seq += 1
        struct.pack_into("<q", self.map, off, self._seq)  # odd: being written
        _REC.pack_into(self.map, off, self._seq, counter, heartbeat, since, world_rank, state, os.getpid(),
                       (name or "").encode()[:100], (where or "").encode()[:124])
        self._seq += 1
        struct.pack_into("<q", self.map, off, self._seq)

    def read(self, slot: int) -> dict | None:
        off = _HEADER + slot * _REC.size
        for _ in range(20):
            rec = _REC.unpack_from(self.map, off)
            if rec[0] % 2 == 0 and struct.unpack_from("<q", self.map, off)[0] == rec[0]:
                break
            time.sleep(0.001)
        _, counter, heartbeat, since, world_rank, state, pid, name, where = rec
        if state == UNWRITTEN:
            return None
        name = name.rstrip(b"\0").decode(errors="replace")
        return {"slot": slot, "counter": counter, "heartbeat": heartbeat, "since": since, "rank": world_rank,
                "state": state, "pid": pid, "name": name if state == IN_STEP else None,
                "where": where.rstrip(b"\0").decode(errors="replace")}

    def peers(self) -> list[dict]:
        return [r for s in range(self.nslots) if s != self.slot and (r := self.read(s)) is not None]

    def claim(self) -> bool:
        """True for the first rank of the node to ask (it is the one that reports)."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            if struct.unpack_from("<i", self.map, 0)[0] != 0:
                return False
            struct.pack_into("<i", self.map, 0, 1 + self.slot)
            return True
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
