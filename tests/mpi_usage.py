"""Jobs that end with a user error, for tests/test_launch.py.

    all        every rank raises UsageError after dist.init
    one        rank 1 raises UsageError alone while rank 0 waits in a barrier
    zero       rank 0 raises UsageError alone while rank 1 waits in a barrier
    preinit    every rank raises UsageError before dist.init
    internal   rank 1 raises a RuntimeError while rank 0 waits in a barrier
    args ...   dist.ArgumentParser over the remaining arguments (try --help, --bad)
"""
import sys

from tw.runtime import dist

mode = sys.argv[1]
if mode == "preinit":
    raise dist.UsageError("--thing must be positive, got -1")
if mode == "args":
    p = dist.ArgumentParser(prog="python -m tests.mpi_usage args", description="A test parser.\n  kept lines")
    p.add_argument("--tokens", type=int, default=64, help="batch size in tokens")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(sys.argv[2:])
    print("parsed", args.tokens, flush=True)
    sys.exit(0)
world = dist.init(None, "cpu")
if mode == "all" or (mode == "one" and world.rank == 1) or (mode == "zero" and world.rank == 0):
    raise dist.UsageError("--thing must be positive, got -1")
if mode == "internal" and world.rank == 1:
    raise RuntimeError("deliberate internal failure on rank 1")
world.comm.Barrier()
dist.shutdown(0)
