"""Per-op timelines of a forward pass, for seeing what overlapped.

Ops are named `L3.attn.A.qkv_gemm`, `L3.comm.A.post_attn_norm`, `L3.mlp.B.down`, ... (layer, block,
half: A / B for TokenWeave's halves, `all` for an unsplit batch, `c2` for a fine-grained chunk, op), and
placed on a lane: `compute` or `comm`. On the GPU each span is a pair of CUDA events recorded on the
op's stream; on the CPU a pair of perf_counter readings (structure only: CPU times mean nothing).

Tracing is off unless a Tracer is active (`with tracing(tracer): ...`); `span` is then an empty
context manager, so an untraced run launches exactly the same GPU work as before. experiments/latency.py
traces one extra eager forward pass after the timed ones (`--trace DIR`), so traced runs never feed
the timed numbers.

Output: Chrome trace JSON (opens in Perfetto / chrome://tracing; pid = rank, tid = lane) and a tidy
CSV with one row per span: rank, lane, name, layer, block, half, op, start_us, dur_us.
"""
from __future__ import annotations

import csv
import json
import time
from contextlib import contextmanager, nullcontext

_active = None

FIELDS = ("rank", "lane", "name", "layer", "block", "half", "op", "start_us", "dur_us")


class Tracer:
    def __init__(self, gpu: bool, rank: int = 0):
        self.gpu, self.rank = gpu, rank
        self.spans = []  # (name, lane, start, end): events on GPU, seconds on CPU
        self.base = None

    def _mark(self, stream):
        if not self.gpu:
            return time.perf_counter()
        import cupy as cp
        ev = cp.cuda.Event()
        ev.record(stream or cp.cuda.get_current_stream())
        return ev

    def start(self, stream=None):
        self.spans.clear()
        self.base = self._mark(stream)

    def rows(self) -> list[dict]:
        """One dict per span, times in microseconds from start(); waits for the device."""
        if self.gpu:
            import cupy as cp
            cp.cuda.Device().synchronize()
            elapsed = lambda a, b: cp.cuda.get_elapsed_time(a, b) * 1e3  # noqa: E731
        else:
            elapsed = lambda a, b: (b - a) * 1e6  # noqa: E731
        out = []
        for name, lane, s, e in self.spans:
            layer, block, half, op = parse(name)
            out.append({"rank": self.rank, "lane": lane, "name": name, "layer": layer, "block": block,
                        "half": half, "op": op, "start_us": elapsed(self.base, s), "dur_us": elapsed(s, e)})
        return out


def parse(name: str):
    """'L3.attn.A.qkv_gemm' -> (3, 'attn', 'A', 'qkv_gemm'); other names -> (-1, name, '', name)."""
    parts = name.split(".")
    if len(parts) == 4 and parts[0].startswith("L") and parts[0][1:].isdigit():
        return int(parts[0][1:]), parts[1], parts[2], parts[3]
    return -1, name, "", name


@contextmanager
def tracing(tracer: Tracer, stream=None):
    """Activate `tracer` for the enclosed code (its clock starts now, on `stream`)."""
    global _active
    tracer.start(stream)
    _active = tracer
    try:
        yield tracer
    finally:
        _active = None


_OFF = nullcontext()


def span(name: str, stream=None, lane: str = "compute"):
    """Time the enclosed launches as op `name` on `lane`. Without an active Tracer this returns a shared
    empty context: no events, no generator, so eager untraced launches pay (almost) nothing."""
    return _OFF if _active is None else _span(_active, name, stream, lane)


@contextmanager
def _span(t: Tracer, name: str, stream, lane: str):
    start = t._mark(stream)
    yield
    t.spans.append((name, lane, start, t._mark(stream)))


def write(rows: list[dict], path_stem: str, meta: dict | None = None) -> tuple[str, str]:
    """Write rows (from every rank) as `<stem>.json` (Chrome trace) and `<stem>.csv`."""
    events = [{"name": r["name"], "cat": r["block"], "ph": "X", "ts": r["start_us"], "dur": r["dur_us"],
               "pid": r["rank"], "tid": r["lane"], "args": {"half": r["half"], "layer": r["layer"]}}
              for r in rows]
    events += [{"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}}
               for rank in sorted({r["rank"] for r in rows})]
    with open(path_stem + ".json", "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms", "otherData": meta or {}}, f)
    with open(path_stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    return path_stem + ".json", path_stem + ".csv"


def read_csv(path) -> list[dict]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["rank"], r["layer"] = int(r["rank"]), int(r["layer"])
        r["start_us"], r["dur_us"] = float(r["start_us"]), float(r["dur_us"])
    return rows


# ---------------------------------------------------------------- analysis (notebooks, tests)

def _union(intervals):
    merged = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return merged


def lane_busy(rows: list[dict], rank: int, lane: str = "compute") -> tuple[float, float]:
    """(us during which some op of `lane` ran on `rank`, us from its first op's start to its last op's end)."""
    spans = [(r["start_us"], r["start_us"] + r["dur_us"]) for r in rows if r["rank"] == rank and r["lane"] == lane]
    if not spans:
        return 0.0, 0.0
    merged = _union(spans)
    return sum(e - s for s, e in merged), merged[-1][1] - merged[0][0]


def _overlap(a, b):
    """Total length of the intersection of two merged interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def overlap_summary(rows: list[dict]) -> list[dict]:
    """Per rank and layer: comm time, the part of it hidden under compute, the exposed rest, and the
    compute lane's idle time inside the layer's span."""
    out = []
    for rank in sorted({r["rank"] for r in rows}):
        for layer in sorted({r["layer"] for r in rows if r["rank"] == rank and r["layer"] >= 0}):
            mine = [r for r in rows if r["rank"] == rank and r["layer"] == layer]
            comm = _union([(r["start_us"], r["start_us"] + r["dur_us"]) for r in mine if r["lane"] == "comm"
                           or r["block"] == "comm"])
            comp = _union([(r["start_us"], r["start_us"] + r["dur_us"]) for r in mine if r["block"] != "comm"])
            comm_us = sum(e - s for s, e in comm)
            hidden = _overlap(comm, comp)
            lo = min(r["start_us"] for r in mine)
            hi = max(r["start_us"] + r["dur_us"] for r in mine)
            busy = sum(e - s for s, e in comp)
            out.append({"rank": rank, "layer": layer, "layer_us": hi - lo, "comm_us": comm_us,
                        "hidden_comm_us": hidden, "exposed_comm_us": comm_us - hidden,
                        "compute_idle_us": (hi - lo) - busy})
    return out
