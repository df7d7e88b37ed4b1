"""One rank of a TP=N job on one GPU (`--emulate-tp N --emulate-rank r`): what it is and what it is not.

The process holds rank r's TP=N weight shards and heads and runs the real fused AR + add + RMSNorm
kernel (cuda/ar_norm_p2p.cu, compiled for TP=N) through the same CTAs. The N-1 peers are STAND-INS:
distinct device allocations of the real size and layout (tw/comm/standin.py), filled with data once.
So, per call, rank r's SMs
  - push its partials of every peer's rows into that peer's stand-in receive area (phase 1),
  - read its own rows' N-1 partial sums from its own receive area, where real peers would have pushed
    them (there: filled once with stand-in data; distinct memory, so no L2 hit a real run would miss),
  - add the residual and norm only its own 1/N of the rows (ceil(T/N); the last ranks may own fewer),
  - write the normed rows locally and push them into the N-1 stand-in outputs (phase 2).
With the pulled kernel (--transport p2p-pull) phase 1 moves nothing and the owner reads its rows' partials
from the stand-ins' staging instead of its own receive area.
Peer arrival is satisfied locally: this rank's arrival flags are preset to "every peer arrived", so
each wait is one acquire load that succeeds at once. With link_gbps (--emulate-link-gbps G) each phase
also ends no earlier than the time a G GB/s link needs for its bytes (cuda/ar_norm_p2p.cu link_floor):
a floor, not a model of contention.

NOT exercised (docs/design.md#emulation): link bandwidth and latency (the pushes go to local HBM, ~4 TB/s,
not NVLink, ~355 GB/s per direction on 2xH200); remote-store and remote-load latency; waiting for a
late peer (skew between ranks); the peers' incoming writes into this GPU's memory (HBM traffic with no
SM work of ours); NVSwitch. The rows this rank does not own are never written by anyone: the model's
output is not the real one, so --check is refused.

DECOMPOSITION RUNS (comm="norm" / "none", --emulate-comm): the fused steps run the owner's add + norm of its
1/N rows only (cuda/ar_norm_p2p.cu p2p_norm_only: no bytes to or from peers, same CTAs), or nothing at all.
Their outputs are not the model's; they exist to split a strategy's cost into the comm kernel's bytes, its
norm and the split itself, each measured (experiments/NOTES.md).

NCCL cannot run on one rank. Its time is PROJECTED (not measured): the emulated nocomm pass plus
2 x layers all-reduces of T rows, interpolated from a named table of measured all-reduce times
(projected_allreduce_us).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

MAX_TP = 8
BANNER = "emulated: one rank of TP={tp} on one GPU; link time not included; nccl projected"
STAND_INS = ("{peers} stand-in peers: distinct device allocations of the real layout, filled once; peer "
             "arrival satisfied locally; pushes land in local HBM (no link)")
# What the fused steps do on an emulated rank (--emulate-comm): the decomposition runs.
COMM_MODES = {"full": "the fused comm kernel", "norm": "fused steps run only their 1/N add + norm, no peer bytes",
              "none": "fused steps skipped (no comm, no norm)"}
PAPER_DIR = Path(__file__).resolve().parents[2] / "experiments" / "paper"


@dataclass(frozen=True)
class Emulation:
    """Rank `rank` of a TP=`tp` job, played by one process on one GPU."""
    tp: int
    rank: int = 0
    link_gbps: float | None = None   # None: no link time; else each comm phase is floored at this rate
    comm: str = "full"               # full: the fused kernel; norm: its norm alone; none: skipped

    def __post_init__(self):
        if not 2 <= self.tp <= MAX_TP:
            raise ValueError(f"--emulate-tp {self.tp}: expected 2..{MAX_TP} (the P2P kernel's TP limit)")
        if not 0 <= self.rank < self.tp:
            raise ValueError(f"--emulate-rank {self.rank}: expected 0..{self.tp - 1} (a rank of TP={self.tp})")
        if self.comm not in COMM_MODES:
            raise ValueError(f"--emulate-comm {self.comm}: expected one of {', '.join(COMM_MODES)}")
        if self.link_gbps is not None and not self.link_gbps > 0:
            raise ValueError(f"--emulate-link-gbps {self.link_gbps}: expected a rate > 0 (GB/s per direction)")

    @property
    def banner(self) -> str:
        text = BANNER.format(tp=self.tp)
        if self.link_gbps:
            text = text.replace("link time not included", f"each comm phase floored at a {self.link_gbps:g} GB/s link")
        if self.comm != "full":
            text += f"; DECOMPOSITION: {COMM_MODES[self.comm]} (outputs are not the model's)"
        return text

    def row_fields(self) -> dict:
        """The columns every emulated result row carries."""
        return {"emulated_tp": self.tp, "emulated_rank": self.rank, "emulated_link_gbps": self.link_gbps,
                "emulated_comm": self.comm, "stand_ins": STAND_INS.format(peers=self.tp - 1)}


# ---------------------------------------------------------------- projected NCCL

@dataclass(frozen=True)
class AllReduceTable:
    """Measured all-reduce times (us) of bf16 tensors, by bytes, for one TP degree, and where from."""
    tp: int
    points: tuple          # ((bytes, us), ...) sorted by bytes
    source: str

    def us(self, num_bytes: float) -> float:
        """Piecewise linear in bytes between the measured points; beyond the ends, the nearest segment's
        line (large all-reduces are bandwidth-bound: linear in bytes)."""
        pts = self.points
        if len(pts) < 2:
            raise ValueError(f"{self.source}: need at least two measured sizes")
        i = 1
        while i < len(pts) - 1 and pts[i][0] < num_bytes:
            i += 1
        (b0, t0), (b1, t1) = pts[i - 1], pts[i]
        return max(0.0, t0 + (t1 - t0) * (num_bytes - b0) / (b1 - b0))


def paper_allreduce_table(path: Path = PAPER_DIR / "figure_4.csv") -> AllReduceTable:
    """TP=8: the paper's NCCL all-reduce (torch.distributed, bf16, hidden 8192) on 8 x H100."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    pts = sorted((int(r["BL"]) * int(r["hidden_size"]) * 2, float(r["torch_all_reduce_us"])) for r in rows)
    return AllReduceTable(8, tuple(pts), f"paper 8xH100 ({path.name}, torch_all_reduce_us; microsoft/tokenweave "
                                         "artifact/csvs, copied to experiments/paper/)")


def measured_allreduce_table(path: Path, tp: int) -> AllReduceTable:
    """Our own measured NCCL all-reduce (experiments.kernels rows, kernel nccl_ar) of a real TP group."""
    from tw.measure.results import read
    rows = [r for r in read(path) if r.get("kernel") == "nccl_ar" and r.get("tp") == tp and r.get("correct")]
    pts = {}
    for r in rows:
        pts.setdefault(int(r["bytes"]), float(r["time_us"]))
    gpu = rows[0].get("gpu", "?") if rows else "?"
    return AllReduceTable(tp, tuple(sorted(pts.items())), f"measured {tp}x{gpu} ({path.name}, nccl_ar)")


def allreduce_table(tp: int, results_dir: Path) -> AllReduceTable | None:
    """The named table for an emulated TP degree, or None where none is committed (TP=4 today)."""
    if tp == 8:
        return paper_allreduce_table()
    if tp == 2:
        path = results_dir / "kernels-H200x2-warp-per-row.jsonl"
        return measured_allreduce_table(path, 2) if path.exists() else None
    return None


def projected_nccl(nocomm_ms: float, tokens: int, hidden: int, layers: int, table: AllReduceTable | None,
                   dtype_bytes: int = 2) -> dict:
    """projected_nccl_ms = nocomm_ms + 2 x layers x AR(tokens x hidden x dtype_bytes), with its source;
    None (and the reason as the source) where no table exists."""
    if table is None or nocomm_ms is None:
        return {"projected_nccl_ms": None, "projected_nccl_source": "no measured all-reduce table for this TP"}
    ar_us = table.us(tokens * hidden * dtype_bytes)
    return {"projected_nccl_ms": nocomm_ms + 2 * layers * ar_us * 1e-3, "projected_allreduce_us": ar_us,
            "projected_nccl_source": table.source}
