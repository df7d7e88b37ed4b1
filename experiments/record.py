"""The measured record: every table of docs/results.md and the README's reproduce and status blocks,
computed from the result files each one names. `python -m experiments.report` writes them into the
documents; `--check` (tests/test_report.py) fails when a document's table differs from its files.

Speedup = nccl's time / the strategy's time, from the same file (the same run, timed round-robin).
"comm paid" = (tokenweave - nocomm) / (nccl - nocomm): the share of the communication's cost tokenweave
still pays (docs/design.md#targets). EMULATED rows come from one process playing one rank of a TP=N job
(docs/design.md#emulation); their nccl times are PROJECTED from measured all-reduce times, never run.
"""
from __future__ import annotations

from collections import defaultdict

from experiments.index import RESULTS
from tw.measure.results import read

PAPER_DIR = RESULTS.parent / "paper"
KERNELS = "kernels-H200x2-warp-per-row.jsonl"   # the fused kernel and NCCL on 2xH200


def rows(name: str) -> list[dict]:
    return read(RESULTS / name)


def table(header: list[str], body: list[list]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(str(c) for c in line) + " |" for line in body])


def span(values, fmt="{:.3f}") -> str:
    """'lo-hi' of some numbers (one number when they agree at that precision; 'lo to hi' below zero)."""
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo} to {hi}" if lo.startswith("-") else f"{lo}-{hi}"


def ms_by(name: str) -> dict:
    """{(tokens, strategy): median_ms} of a latency file."""
    return {(r["tokens"], r["strategy"]): r["median_ms"] for r in rows(name)}


def gap(worst: float, target: float, digits: int = 0) -> str:
    """'missed by N points': percentage points between the worst value and the target."""
    return f"missed by {100 * (worst - target):.{digits}f} points"


def paid(ms: dict, tokens: int) -> float | None:
    """(tokenweave - nocomm) / (nccl - nocomm) at one token count, or None if a time is missing."""
    t, b, n = (ms.get((tokens, s)) for s in ("tokenweave", "nocomm", "nccl"))
    return None if None in (t, b, n) else (t - b) / (n - b)


# ---- end to end on 2 x H200 --------------------------------------------------------------------------

E2E = ("latency-llama3-70b-tp2-H200-e2e-tuned.jsonl", "latency-llama3-70b-tp2-H200-tuned.jsonl",
       "latency-llama3-70b-tp2-H200-e2e-warp-per-row.jsonl", "latency-qwen2.5-72b-tp2-H200-tuned.jsonl",
       "latency-qwen2.5-72b-tp2-H200-e2e-warp-per-row.jsonl", "latency-llama3-70b-shard-as-tp8-on-tp2-H200-tuned.jsonl",
       "latency-llama3-70b-shard-as-tp8-on-tp2-H200-warp-per-row.jsonl", "latency-llama3-70b-tp2-H200-transport-nccl.jsonl")
E2E_STRATEGIES = ("nocomm", "fused", "tokenweave", "finegrained2", "finegrained4", "finegrained8")


def _setting(rs: list[dict]) -> str:
    r = rs[0]
    shard = f", shards of TP={r['shard_as_tp']}" if r.get("shard_as_tp") else ""
    nccl_transport = any(x["strategy"] == "fused" and x.get("transport") == "nccl" for x in rs)
    return f"{r['model']}{shard}{', fused over NCCL' if nccl_transport else ''}"


def e2e_table() -> str:
    body = []
    for name in E2E:
        rs = rows(name)
        ms = ms_by(name)
        for tokens in sorted({r["tokens"] for r in rs}):
            tw = [r for r in rs if r["tokens"] == tokens and r["strategy"] == "tokenweave"]
            checked = [r["correct"] for r in rs if r["tokens"] == tokens and r.get("correct") is not None]
            cells = [f"{ms[(tokens, 'nccl')] / ms[(tokens, s)]:.3f}" if (tokens, s) in ms else "-" for s in E2E_STRATEGIES]
            body.append([f"`{name}`", _setting(rs), tokens, f"{ms[(tokens, 'nccl')]:.2f}", *cells,
                         tw[0].get("split_source") or "-" if tw else "-",
                         ("pass" if all(checked) else "FAIL") if checked else "-"])
    return table(["file", "setting", "tokens", "nccl ms", *E2E_STRATEGIES, "tokenweave split", "vs float64"], body)


def spread_table() -> str:
    """nccl and nocomm at each token count over every current run of the same configuration (llama3-70b
    and qwen2.5-72b, TP=2, 4 layers, 1024-token sequences, no decode, CUDA graphs, timed round-robin)."""
    runs = defaultdict(list)
    for path in sorted(RESULTS.glob("latency-*.jsonl")):
        for r in read(path):
            if (r.get("strategy") in ("nccl", "nocomm") and r.get("tp") == 2 and r.get("graph") and not r.get("decode")
                    and r.get("repeats") and not r.get("prefix") and not r.get("paper") and not r.get("emulated_tp")
                    and not r.get("shared_gpu")):
                key = (r["model"], r.get("shard_as_tp") or 2, r["layers"], r["seq_len"], r["strategy"], r["tokens"])
                runs[key].append((r["median_ms"], path.name))
    body = []
    for (model, shards, layers, seq, strategy, tokens), found in sorted(runs.items()):
        if len(found) < 2:
            continue
        ms = [m for m, _ in found]
        body.append([model + (f", shards of TP={shards}" if shards != 2 else ""), strategy, tokens, len(ms),
                     f"{min(ms):.2f}", f"{max(ms):.2f}", f"{100 * (max(ms) - min(ms)) / min(ms):.1f}%",
                     ", ".join(f"`{n}`" for _, n in sorted(found, key=lambda f: f[1]))])
    return table(["model (TP=2, 4 layers)", "strategy", "tokens", "runs", "min ms", "max ms", "spread", "files"], body)


PAID = (("latency-llama3-70b-tp2-H200-e2e-tuned.jsonl", True), ("latency-llama3-70b-tp2-H200-tuned.jsonl", True),
        ("latency-qwen2.5-72b-tp2-H200-tuned.jsonl", True), ("latency-qwen2.5-72b-tp2-H200-e2e-warp-per-row.jsonl", True),
        ("latency-llama3-70b-shard-as-tp8-on-tp2-H200-tuned.jsonl", False))


def paid_target(tokens: int, at_4k: bool) -> float | None:
    """docs/design.md#targets: <= 10% at 4K (TP=2 shapes), <= 0 from 8K."""
    return 0.0 if tokens >= 8192 else (0.10 if tokens == 4096 and at_4k else None)


def paid_table() -> str:
    body = []
    for name, at_4k in PAID:
        ms = ms_by(name)
        for tokens in sorted({t for t, _ in ms}):
            p, target = paid(ms, tokens), paid_target(tokens, at_4k)
            if p is None or target is None:
                continue
            status = "met" if p <= target else f"missed by {100 * (p - target):.0f} points"
            body.append([f"`{name}`", _setting(rows(name)), tokens, f"{100 * p:.0f}%", f"<= {100 * target:.0f}%", status])
    return table(["file", "setting", "tokens", "comm paid", "target", "status"], body)


def mixtral_table() -> str:
    name = "latency-mixtral-8x22b-tp1-all-strategies-H200.jsonl"
    ms = ms_by(name)
    return table(["file", "tokens", *(s for _, s in sorted(ms))],
                 [[f"`{name}`", t, *(f"{ms[(t, s)]:.1f} ms" for tt, s in sorted(ms) if tt == t)]
                  for t in sorted({t for t, _ in ms})])


# ---- EMULATED -------------------------------------------------------------------------------------------

def emulated_table() -> str:
    """tokenweave / nocomm per emulated TP and token count; nocomm vs the PROJECTED nccl."""
    body = []
    for model in ("llama3-70b", "qwen2.5-72b"):
        for tp in (2, 4, 8):
            name = f"latency-{model}-emulated-tp{tp}-H200.jsonl"
            rs = rows(name)
            tw = {r["tokens"]: r["vs_nocomm"] for r in rs if r["strategy"] == "tokenweave"}
            nocomm = [r for r in rs if r["strategy"] == "nocomm"]
            proj = [r["projected_speedup_vs_nccl"] for r in nocomm if r.get("projected_speedup_vs_nccl") is not None]
            body.append([f"`{name}`", model, f"EMULATED {tp}", *(f"{tw[t]:.3f}" if t in tw else "-" for t in (4096, 8192, 16384, 32768)),
                         f"{span(proj)} PROJECTED" if proj else "-", _projection_source(nocomm[0].get("projected_nccl_source", ""))])
    return table(["file", "model", "TP", "tokenweave / nocomm, 4K", "8K", "16K", "32K", "nocomm vs nccl", "nccl projected from"], body)


def _projection_source(source: str) -> str:
    if "figure_4.csv" in source:
        return "the paper's 8xH100 all-reduce times (experiments/paper/figure_4.csv)"
    if "kernels-H200x2" in source:
        return f"NCCL all-reduce on 2xH200 (`{KERNELS}`)"
    return "nothing: " + source if source else "-"


def emulated_ctas_table() -> str:
    body = []
    for ctas, name in ((4, "latency-llama3-70b-emulated-tp8-ctas4-H200.jsonl"), (8, "latency-llama3-70b-emulated-tp8-H200.jsonl"),
                       (16, "latency-llama3-70b-emulated-tp8-ctas16-H200.jsonl"), (32, "latency-llama3-70b-emulated-tp8-ctas32-H200.jsonl")):
        tw = {r["tokens"]: r["vs_nocomm"] for r in rows(name) if r["strategy"] == "tokenweave"}
        body.append([f"`{name}`", ctas, *(f"{tw[t]:.3f}" if t in tw else "-" for t in (4096, 8192, 16384, 32768))])
    return table(["file", "CTAs", "tokenweave / nocomm, EMULATED TP=8, 4K", "8K", "16K", "32K"], body)


# ---- correctness ----------------------------------------------------------------------------------------

def checks() -> list[dict]:
    """Every current GPU latency or throughput file whose rows carry a check against the float64
    reference: {file, model, on, checked, passed, rel_errs}."""
    out = []
    for path in sorted(RESULTS.glob("*.jsonl")):
        rs = read(path)
        checked = [r for r in rs if r.get("correct") is not None or r.get("check_logits_rel_err") is not None]
        if not checked or not path.name.startswith(("latency-", "throughput-")) or str(rs[0].get("gpu", "")).startswith("none"):
            continue
        n = rs[0]["world_size"]
        out.append({"file": path.name, "model": rs[0].get("model", "-"), "checked": len(checked),
                    "on": f"{n} ranks sharing 1 GPU" if rs[0].get("shared_gpu") else f"{n} GPU{'s' if n > 1 else ''}",
                    "passed": sum(bool(r["correct"]) if r.get("correct") is not None
                                  else r["check_logits_rel_err"] <= r["check_tolerance"] for r in checked),
                    "rel_errs": [e for e in (r.get("rel_err", r.get("check_logits_rel_err")) for r in checked) if e is not None]})
    return out


def checks_table() -> str:
    return table(["file", "model", "on", "checked rows", "passed", "rel_err vs float64"],
                 [[f"`{c['file']}`", c["model"], c["on"], c["checked"], c["passed"],
                   span(c["rel_errs"], "{:.1e}") if c["rel_errs"] else "-"] for c in checks()])
