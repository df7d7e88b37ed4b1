"""Rank 1 raises while rank 0 waits in a collective: the job must end with rank 1's message, not hang."""
from tw.runtime import dist

world = dist.init(None, "cpu")
if world.rank == 1:
    raise RuntimeError("deliberate failure on rank 1")
world.comm.barrier()
