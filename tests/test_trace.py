"""Trace naming, file output and the overlap analysis the notebooks use."""
import json

from conftest import run_mpi
from tw.measure import trace


def row(name, lane, start, dur, rank=0):
    layer, block, half, op = trace.parse(name)
    return {"rank": rank, "lane": lane, "name": name, "layer": layer, "block": block, "half": half, "op": op,
            "start_us": float(start), "dur_us": float(dur)}


def test_parse_names():
    assert trace.parse("L3.attn.A.qkv_gemm") == (3, "attn", "A", "qkv_gemm")
    assert trace.parse("L12.comm.c2.o_proj_allreduce") == (12, "comm", "c2", "o_proj_allreduce")
    assert trace.parse("embed.all") == (-1, "embed.all", "", "embed.all")


def test_overlap_summary_counts_hidden_and_exposed_comm():
    rows = [row("L0.attn.A.qkv_gemm", "compute", 0, 10), row("L0.attn.B.qkv_gemm", "compute", 10, 10),
            row("L0.comm.A.post_attn_norm", "comm", 12, 12),   # 8 us under B's GEMM, 4 us exposed
            row("L0.mlp.A.gate_up", "compute", 24, 6)]
    (s,) = trace.overlap_summary(rows)
    assert (s["comm_us"], s["hidden_comm_us"], s["exposed_comm_us"]) == (12.0, 8.0, 4.0)
    assert s["layer_us"] == 30.0 and s["compute_idle_us"] == 4.0


def test_no_span_without_tracer():
    with trace.span("L0.attn.A.qkv_gemm"):
        pass  # nothing recorded, nothing raised
    t = trace.Tracer(gpu=False)
    with trace.tracing(t):
        with trace.span("L0.attn.A.qkv_gemm"):
            pass
    assert [r["name"] for r in t.rows()] == ["L0.attn.A.qkv_gemm"]


def test_latency_trace_files(tmp_path):
    proc = run_mpi(2, ["-m", "experiments.latency", "--device", "cpu", "--tokens", "1100", "--strategies",
                       "tokenweave", "--trace", str(tmp_path), "--out", str(tmp_path / "r.jsonl")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    stem = tmp_path / "trace-tiny-tp2-tokenweave-1100"
    events = json.loads(stem.with_suffix(".json").read_text())["traceEvents"]
    names = {e["name"] for e in events}
    # both halves, both ranks, comm on its own lane, every layer's four comm steps
    assert {"L0.attn.A.qkv_gemm", "L0.attn.B.qkv_gemm", "L1.comm.B.final_norm", "L0.comm.A.next_norm"} <= names
    assert {e["pid"] for e in events if e["ph"] == "X"} == {0, 1}
    assert {e["tid"] for e in events if e["name"].startswith("L0.comm")} == {"comm"}
    rows = trace.read_csv(stem.with_suffix(".csv"))
    assert len([r for r in rows if r["block"] == "comm" and r["rank"] == 0]) == 2 * 4
