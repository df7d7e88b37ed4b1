"""The emulated rank's flags and checks (--emulate-tp N: one process plays one rank of a TP=N job over
stand-in peers; tw/comm/emulation.py, docs/design.md#emulation), shared by every experiment that has them.
"""
from __future__ import annotations

from tw.runtime import dist


def add_emulation_flags(p) -> None:
    """--emulate-tp N, --emulate-rank R, --emulate-link-gbps G, --emulate-comm MODE, in their own group
    (checked in init: check_emulation)."""
    g = p.add_argument_group("emulated rank (one process, no mpirun -n; docs/design.md#emulation)")
    g.add_argument("--emulate-tp", type=int, default=None, metavar="N",
                   help="play one rank of TP=N (2..8): its shards, its comm kernel into stand-in peers; nccl "
                        "projected")
    g.add_argument("--emulate-rank", type=int, default=None, metavar="R",
                   help="the rank to play, 0..N-1 (default: 0)")
    g.add_argument("--emulate-link-gbps", type=float, default=None, metavar="G",
                   help="each comm phase lasts at least its bytes over a G GB/s link (2xH200 NV18: ~355) "
                        "(default: no link time)")
    g.add_argument("--emulate-comm", choices=("full", "norm", "none"), default=None, metavar="MODE",
                   help="full = the fused comm kernel; DECOMPOSITION runs, outputs not the model's: norm = its "
                        "1/N add + norm alone; none = fused steps skipped (default: full)")


def check_emulation(args, world) -> None:
    """--emulate-tp / --emulate-rank: one rank, no --shard-as-tp, N in 2..8, R in 0..N-1. Sets
    args._emulation (a tw.comm.emulation.Emulation, or None)."""
    n, r = getattr(args, "emulate_tp", None), getattr(args, "emulate_rank", None)
    link = getattr(args, "emulate_link_gbps", None)
    comm = getattr(args, "emulate_comm", None)
    args._emulation = None
    if n is None:
        given = [f for f, v in (("rank", r), ("link-gbps", link), ("comm", comm)) if v is not None]
        if given:
            raise dist.UsageError(f"--emulate-{given[0]} needs --emulate-tp N (the TP degree whose rank to play)")
        return
    if world.size != 1:
        raise dist.UsageError(f"--emulate-tp {n} plays one rank of TP={n} in ONE process; this job has {world.size} "
                              "ranks: start it without mpirun -n (or with -n 1)")
    if getattr(args, "shard_as_tp", None) is not None:
        raise dist.UsageError("--emulate-tp and --shard-as-tp do not combine: --emulate-tp N already holds the "
                              "TP=N shards; drop --shard-as-tp")
    from tw.comm.emulation import Emulation
    try:
        args._emulation = Emulation(n, 0 if r is None else r, link, comm or "full")
    except ValueError as e:
        raise dist.UsageError(str(e)) from None
    if getattr(args, "check", False):
        raise dist.UsageError(f"--check with --emulate-tp {n}: the emulated rank computes only its own 1/{n} of "
                              "each norm's rows (the stand-in peers compute nothing), so its output is not the "
                              "model's; check correctness on ranks sharing a GPU (TW_SHARE_GPU=1) instead")
    if getattr(args, "transport", "p2p") not in ("p2p", "p2p-pull"):
        raise dist.UsageError(f"--transport {args.transport} with --emulate-tp: only p2p is emulated (nccl needs real "
                              "ranks; a same-device copy runs on the SMs, so a ce emulation would not be faithful)")


def emulation(args):
    """The run's tw.comm.emulation.Emulation, or None."""
    return getattr(args, "_emulation", None)


def emulation_strategies(args) -> None:
    """Under --emulate-tp, nccl and finegrained (NCCL between real ranks) cannot run: named explicitly
    they are an error; left to the defaults, nccl is dropped and projected instead (tw/comm/emulation.py)."""
    from tw.schedule import strategies as schedules
    emu = emulation(args)
    if emu is None:
        return
    nccl = [s for s in args.strategies if s == "nccl" or schedules.finegrained_k(s) is not None]
    if nccl and getattr(args, "_strategies_given", True):
        raise dist.UsageError(f"--strategies {' '.join(nccl)} with --emulate-tp: NCCL needs one real rank per GPU; "
                              "an emulated run reports nccl as projected_nccl_ms instead (drop them from --strategies)")
    args.strategies = [s for s in args.strategies if s not in nccl]
    if "nocomm" not in args.strategies:  # the projection and every ratio are taken against it
        args.strategies.insert(0, "nocomm")
