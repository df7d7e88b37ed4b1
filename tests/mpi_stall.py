"""Jobs for the stalled-peer watchdog and Ctrl-C tests (tests/test_launch.py); run with TW_TIMEOUT_S=5.

    stop       rank 1 stops itself (SIGSTOP) inside a step while rank 0 waits in a barrier
    sleep      rank 1 sleeps (alive) inside its own step while rank 0 waits in a barrier
    same       every rank is in one step; rank 1 sleeps in it while the others wait in a barrier
    ok         steps that each take less than TW_TIMEOUT_S, and a long pause outside any step: not killed
    interrupt  every rank sleeps inside a step after printing 'ready' (the test sends Ctrl-C)
    interrupt-blocked  likewise, but every rank waits inside MPI (rank 0 in a barrier, rank 1 in a
               receive that never comes), where Python cannot raise KeyboardInterrupt
"""
import os
import signal
import sys
import time

from tw.runtime import dist

mode = sys.argv[1]
world = dist.init(None, "cpu")
with dist.step("setup"):
    world.comm.Barrier()

if mode in ("stop", "sleep"):
    if world.rank == 1:
        with dist.step("slow work on rank 1"):
            if mode == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(600)
    with dist.step("waiting for rank 1"):
        world.comm.Barrier()
elif mode == "same":
    with dist.step("exchange"):
        if world.rank == 1:
            time.sleep(600)
        world.comm.Barrier()
elif mode == "ok":
    for i in range(2):
        with dist.step(f"round {i}"):
            time.sleep(1.5 if world.rank == 1 else 0.1)
            world.comm.Barrier()  # rank 0 waits 1.5 s for rank 1: inside the bound
    dist.step(None)
    time.sleep(4)  # outside any step: unbounded
    world.comm.Barrier()
    with dist.step("last"):
        world.comm.Barrier()
    world.print0("done")
elif mode == "interrupt":
    with dist.step("sleeping"):
        world.comm.Barrier()
        world.print0("ready")
        time.sleep(60)
elif mode == "interrupt-blocked":
    import numpy as np
    with dist.step("blocked"):
        world.comm.Barrier()
        world.print0("ready")
        if world.rank == 0:
            world.comm.Barrier()
        else:
            world.comm.Recv(np.zeros(1), source=0, tag=7)
dist.shutdown(0)
