"""The measured record: every table of docs/results.md and the README's reproduce table, computed from
the result files each one names (experiments/report.py writes them into the documents and checks them).

    python -m experiments.record            # print every table

Speedup = nccl's time / the strategy's time, from the same file (the same run, timed round-robin).
"comm paid" = (tokenweave - nocomm) / (nccl - nocomm): the share of the communication's cost tokenweave
still pays (docs/design.md#targets). EMULATED rows come from one process playing one rank of a TP=N job
(docs/design.md#emulation); their nccl times are PROJECTED from measured all-reduce times, never run.
"""
from __future__ import annotations

import csv
import statistics
from collections import defaultdict

from experiments.fidelity import PAPER_MODEL, paper_times
from experiments.index import RESULTS
from tw.measure.results import read

PAPER_DIR = RESULTS.parent / "paper"


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


# ---- the fused kernel, the SMs, interference ---------------------------------------------------------

KERNELS = "kernels-H200x2-warp-per-row.jsonl"


def kernels_table() -> str:
    """p2p_fused (two-shot) and p2p_ar against NCCL's all-reduce alone, hidden 8192, TP=2."""
    from experiments.kernels import per_sm_gbps, sm_bytes
    rs = [r for r in rows(KERNELS) if r["hidden"] == 8192]
    nccl = {r["tokens"]: r["time_us"] for r in rs if r["kernel"] == "nccl_ar"}
    per_sm, _ = per_sm_gbps()
    body = []
    for r in sorted((r for r in rs if r["kernel"] in ("p2p_fused", "p2p_ar") and r["tokens"] in (1024, 8192, 32768)
                     and r["ctas"] in (8, 16, 32, 132) and not r.get("oneshot")),
                    key=lambda r: (r["kernel"], r["tokens"], r["ctas"])):
        floor_us = sm_bytes(r["kernel"], r["tokens"], 8192, 2) / (r["ctas"] * per_sm * 1e3)
        body.append([r["kernel"], r["tokens"], r["ctas"], f"{r['time_us']:.0f}", f"{nccl[r['tokens']]:.0f}",
                     f"{r['time_us'] / nccl[r['tokens']]:.2f}", f"{r['algbw_gbps']:.0f}", f"{r['time_us'] / floor_us:.2f}"])
    return table(["kernel", "tokens", "CTAs", "us", "NCCL all-reduce us", "vs NCCL", "algbw GB/s", "vs SM floor"], body)


def sm_rate_table() -> str:
    return table(["CTAs (one per SM)", "GB/s", "GB/s per SM"],
                 [[r["ctas"], f"{r['gbps']:.0f}", f"{r['gbps_per_sm']:.1f}"] for r in rows("sm_rate-H200.jsonl")])


INTERFERENCE = ("interference-llama3-70b-tp2-H200.jsonl", "interference-llama3-70b-shard-as-tp8-on-tp2-H200.jsonl")


def interference_table() -> str:
    body = []
    for name in INTERFERENCE:
        for r in sorted(rows(name), key=lambda r: (r["tokens"], r["ctas"])):
            ratio = r["steal_ms"] / r["sm_bound_ms"]
            body.append([f"`{name}`", r["tokens"], r["ctas"], f"{r['gemm_ms']:.2f}", f"{r['gemm_ov_ms']:.2f}",
                         f"{r['steal_ms']:.3f}", f"{r['sm_bound_ms']:.3f}", f"{ratio:.2f}",
                         "met" if ratio <= 1.2 else "missed", f"{100 * r['hidden']:.0f}%" if "hidden" in r else "-"])
    return table(["file", "rows", "CTAs", "GEMMs alone ms", "beside the kernel ms", "extra ms", "SM-share bound ms",
                  "extra / bound", "target <= 1.2", "comm hidden"], body)


SM_SHARE = (("sm_share-H200.jsonl", None), ("sm_share-norm-llama3-70b-tp2-H200.jsonl", "norm"),
            ("sm_share-norm-llama-qwen-tp2-tp8-shards-H200.jsonl", "norm"),
            ("sm_share-pairs-llama-qwen-tp2-tp8-shards-H200.jsonl", "held"),
            ("sm_share-pairs-llama-qwen-tp2-tp8-shards-H200.jsonl", "pairs"))
BESIDE = {None: "k held SMs", "held": "k held SMs", "pairs": "k SMs held as 2-CTA clusters", "norm": "the CE norm kernel, k CTAs"}


def sm_share_table() -> str:
    body = []
    for name, kind in SM_SHARE:
        groups = defaultdict(list)
        for r in rows(name):
            if r["held"] and r.get("kind") == kind and r.get("excess") is not None:
                groups[(r["held"], r["target"])].append(r["excess"])
        for (k, target), ex in sorted(groups.items()):
            body.append([f"`{name}`", BESIDE[kind], k, target, len(ex), f"{statistics.median(ex):.2f}",
                         f"{sum(e <= 1.2 for e in ex)} of {len(ex)}"])
    return table(["file", "beside the GEMM", "k", "SM target", "points", "median excess", "within 1.2x"], body)


# ---- split, tune, MoE, serving, overhead, attention ----------------------------------------------------

TUNE = ("tune-llama3-70b-tp2-H200-warm-profile.jsonl", "tune-llama3-70b-tp2-H200-16k.jsonl",
        "tune-qwen2.5-72b-tp2-H200-exhaustive-4k-8k.jsonl")


def wave_table() -> str:
    body = []
    for name in TUNE:
        for r in rows(name):
            if r.get("kind") == "choice" and r.get("wave_vs_best") is not None:
                w = r["wave_vs_best"]
                body.append([f"`{name}`", r["model"], r["tokens"], r["split_at"], r["best_split"], f"{w:.4f}",
                             "met" if w <= 1.01 else _gap(w, 1.01, 1)])
    return table(["file", "model", "tokens", "wave rule's split", "searched best", "time vs best", "target <= 1.01"], body)


def split_rules_table() -> str:
    body = [[r["tokens"], r["profile"], "/".join(map(str, r["held"])) if r.get("held") else "-",
             ", ".join(map(str, r["ranked"][:3]))] for r in rows("split-rules-llama3-70b-tp2-H200.jsonl")]
    return table(["tokens", "GEMM profile", "SMs held (attention / MLP)", "the rule's first three split points"], body)


def mlp_split_table() -> str:
    rs = rows("split-tp2-H200.jsonl")
    return table(["halves", "tokens", "MLP block time / unsplit"],
                 [[k, span([r["tokens"] for r in rs if r["kind"] == k], "{}"),
                   span([r["vs_unsplit"] for r in rs if r["kind"] == k], "{:.2f}")] for k in ("equal", "wave")])


MOE = ("moe-block-mixtral-8x22b-tp1-H200.jsonl", "moe-block-mixtral-8x22b-tp1-row-copies-H200.jsonl",
       "moe-block-mixtral-8x22b-tp8-shards-gather-timed-H200.jsonl")


def moe_table() -> str:
    body = []
    for name in MOE:
        for r in sorted(rows(name), key=lambda r: (r["mode"], r["tokens"])):
            body.append([f"`{name}`", r["shard_tp"], r["mode"], r["tokens"], f"{r['tflops']:.0f}", f"{r['vs_dense']:.2f}",
                         f"{100 * r['routing_share']:.1f}%", f"{r['imbalance']:.2f}"])
    return table(["file", "expert shards of TP", "expert GEMMs", "tokens", "TFLOP/s", "vs dense GEMM",
                  "routing share of the block", "largest expert / mean"], body)


def host_table() -> str:
    name = "throughput-llama3-70b-tp1-shard-as-tp2-H200.jsonl"
    return table(["file", "strategy", "tokens/s", "step ms", "host ms per step", "host / GPU", "issuing the forward ms"],
                 [[f"`{name}`", r["strategy"], f"{r['total_tokens_per_s']:.0f}", f"{r['step_ms_median']:.0f}",
                   f"{r['host_ms_median']:.2f}", f"{100 * r['host_over_gpu']:.1f}%", f"{r['launch_ms_median']:.0f}"]
                  for r in rows(name)])


def overhead_table() -> str:
    return table(["tokens", "nccl ms", "nocomm ms", "comm share (ablation)", "all-reduce alone", "add + RMSNorm alone"],
                 [[r["tokens"], f"{r['nccl_ms']:.2f}", f"{r['nocomm_ms']:.2f}", f"{100 * r['comm_share']:.1f}%",
                   f"{100 * r['allreduce_share']:.1f}%", f"{100 * r['norm_share']:.1f}%"]
                  for r in rows("overhead-llama3-70b-tp2-H200.jsonl")])


def attention_table() -> str:
    """Causal prefill attention, one H200: torch's SDPA (which picks cuDNN) against our best kernel."""
    rs = rows("attention-H200-20261121-230856.jsonl")
    body = []
    for key in sorted({(r["num_heads"], r["num_kv_heads"], r["seqs"], r["tokens"]) for r in rs}):
        at = [r for r in rs if (r["num_heads"], r["num_kv_heads"], r["seqs"], r["tokens"]) == key]
        torch = next(r for r in at if r["impl"] == "torch")
        best = max((r for r in at if r["impl"].startswith("tw_")), key=lambda r: r["tflops"])
        body.append([*key, f"{torch['tflops']:.0f}", best["impl"], f"{best['tflops']:.0f}", f"{best['tflops'] / torch['tflops']:.2f}"])
    return table(["heads", "KV heads", "sequences", "tokens", "torch SDPA TFLOP/s", "our best kernel", "TFLOP/s",
                  "ours / torch"], body)


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

def checks_table() -> str:
    """Every current GPU file whose rows carry a check against the float64 reference."""
    body = []
    for path in sorted(RESULTS.glob("*.jsonl")):
        rs = read(path)
        checked = [r for r in rs if r.get("correct") is not None or r.get("check_logits_rel_err") is not None]
        if not checked or not path.name.startswith(("latency-", "throughput-")) or str(rs[0].get("gpu", "")).startswith("none"):
            continue
        ok = sum(bool(r["correct"]) if r.get("correct") is not None else r["check_logits_rel_err"] <= r["check_tolerance"]
                 for r in checked)
        errs = [e for e in (r.get("rel_err", r.get("check_logits_rel_err")) for r in checked) if e is not None]
        n = rs[0]["world_size"]
        where = f"{n} ranks sharing 1 GPU" if rs[0].get("shared_gpu") else f"{n} GPU{'s' if n > 1 else ''}"
        body.append([f"`{path.name}`", rs[0].get("model", "-"), where, len(checked), ok,
                     span(errs, "{:.1e}") if errs else "-"])
    return table(["file", "model", "on", "checked rows", "passed", "rel_err vs float64"], body)


# ---- the README: reproduce table, status -----------------------------------------------------------------

def _paper_kernel_ratio(tokens: int) -> float:
    with open(PAPER_DIR / "figure_4.csv") as f:
        r = next(r for r in csv.DictReader(f) if int(r["BL"]) == tokens and int(r["hidden_size"]) == 8192)
    return float(r["fused_arln_us"]) / float(r["torch_all_reduce_us"])


def _paper_throughput_ratio(model: str, experiment: str) -> float:
    with open(PAPER_DIR / "figure_12a.csv") as f:
        r = next(r for r in csv.DictReader(f) if r["model"] == PAPER_MODEL[model] and r["experiment"] == experiment)
    return float(r["overlap_fused"]) / float(r["no_ar"])


def _vs_nocomm(name: str, tokens) -> str:
    tw = {r["tokens"]: r["vs_nocomm"] for r in rows(name) if r["strategy"] == "tokenweave" and r["tokens"] in tokens}
    return " / ".join(f"{tw[t]:.2f}" for t in sorted(tw))


def _paper_vs_no_ar(model: str, tokens) -> str:
    paper = paper_times()
    return " / ".join(f"{paper[(model, t)]['overlap_fused'] / paper[(model, t)]['no_ar']:.2f}" for t in sorted(tokens))


def reproduce_table() -> str:
    """Paper figure -> our command -> our result file -> our number beside the paper's."""
    from experiments.figures import PAPER
    over = rows("overhead-llama3-70b-tp2-H200.jsonl")
    k = {(r["kernel"], r["ctas"]): r["time_us"] for r in rows(KERNELS) if r["hidden"] == 8192 and r["tokens"] == 8192}
    waves = [r["wave_vs_best"] for n in TUNE for r in rows(n) if r.get("kind") == "choice" and r.get("wave_vs_best") is not None]
    e2e = ms_by(E2E[0])
    big = [t for t, s in e2e if s == "tokenweave" and t >= 4096]
    paper = paper_times()
    host = {r["strategy"]: r["total_tokens_per_s"] for r in rows("throughput-llama3-70b-tp1-shard-as-tp2-H200.jsonl")}
    share, src = PAPER["comm_overhead_max"]
    tp8 = (4096, 8192, 16384, 32768)
    lines = [
        ("Fig. 1/3: communication and RMSNorm share", "`mpirun -n 2 python -m experiments.overhead`",
         "overhead-llama3-70b-tp2-H200.jsonl",
         f"all-reduce {span([100 * r['comm_share'] for r in over], '{:.1f}')}% of the forward by ablation, "
         f"{span([100 * r['allreduce_share'] for r in over], '{:.1f}')}% alone; add + RMSNorm "
         f"{span([100 * r['norm_share'] for r in over], '{:.1f}')}% (TP=2, 1K-16K tokens)",
         f"up to {100 * share:.0f}% ({src.split(':')[0]})"),
        ("Table 1, Fig. 4: fused AR + RMSNorm vs all-reduce alone, 8K tokens", "`mpirun -n 2 python -m experiments.kernels`",
         KERNELS, f"{k[('p2p_fused', 8)] / k[('nccl_ar', 0)]:.2f}x NCCL's time at 8 CTAs, "
                  f"{k[('p2p_fused', 132)] / k[('nccl_ar', 0)]:.2f}x at 132 (P2P push, TP=2)",
         f"{_paper_kernel_ratio(8192):.2f}x torch's all-reduce (multimem, TP=8; figure_4.csv)"),
        ("Fig. 9: wave-aware split", "`mpirun -n 2 python -m experiments.tune`", ", ".join(TUNE),
         f"the rule's split takes {span(waves, '{:.3f}')}x the searched best's time (4K-16K)", "-"),
        ("Fig. 11a: latency vs the baseline", "`mpirun -n 2 python -m experiments.latency`", E2E[0],
         f"tokenweave {span([e2e[(t, 'nccl')] / e2e[(t, 'tokenweave')] for t in big])}x of nccl, nocomm "
         f"{span([e2e[(t, 'nccl')] / e2e[(t, 'nocomm')] for t in big])}x (2xH200, TP=2, 4K-32K)",
         f"tokenweave {span([paper[('llama3-70b', t)]['baseline_multimem'] / paper[('llama3-70b', t)]['overlap_fused'] for t in big])}x "
         "of its multimem baseline (8xH100, TP=8; figure_11a.csv)"),
        ("Fig. 11a at TP=8: tokenweave / no communication", "`python -m experiments.latency --emulate-tp 8`",
         "latency-llama3-70b-emulated-tp8-H200.jsonl", f"EMULATED: {_vs_nocomm('latency-llama3-70b-emulated-tp8-H200.jsonl', tp8)} at 4K / 8K / 16K / 32K",
         f"{_paper_vs_no_ar('llama3-70b', tp8)} (figure_11a.csv)"),
        ("Fig. 2/11 as the paper ran it: one prompt, 80 layers, eager", "`python -m experiments.latency --paper --emulate-tp 8`",
         "latency-paper-llama3-70b-emulated-tp8-H200.jsonl",
         f"EMULATED: {_vs_nocomm('latency-paper-llama3-70b-emulated-tp8-H200.jsonl', (1024, 4096, 16384))} at 1K / 4K / 16K",
         f"{_paper_vs_no_ar('llama3-70b', (1024, 4096, 16384))} (figure_11a.csv)"),
        ("Mixtral-8x22B, tokenweave / no communication", "`python -m experiments.latency --model mixtral-8x22b --emulate-tp 8`",
         "latency-mixtral-8x22b-emulated-tp8-H200.jsonl",
         f"EMULATED: {_vs_nocomm('latency-mixtral-8x22b-emulated-tp8-H200.jsonl', (2048, 4096, 8192, 16384))} at 2K-16K, eager",
         f"{_paper_vs_no_ar('mixtral-8x22b', (2048, 4096, 8192, 16384))} (figure_11a.csv)"),
        ("Fig. 12a: throughput, tokenweave / no communication", "`mpirun -n 2 python -m experiments.throughput`",
         "throughput-llama3-70b-tp1-shard-as-tp2-H200.jsonl",
         f"{host['tokenweave'] / host['nocomm']:.3f} on ONE GPU holding TP=2 shards (the split's cost alone; 2 GPUs not measured)",
         f"{_paper_throughput_ratio('llama3-70b', '(1024, 128)'):.3f} at 1024-in / 128-out (figure_12a.csv)"),
        ("Fig. 11b/12b: TP=4 and TP=8 on real GPUs", "`scripts/run-multi-gpu`", "-", "not run: no 4- or 8-GPU machine lent", "-"),
    ]
    return table(["paper", "command", "result file", "ours", "paper (8xH100)"],
                 [[what, cmd, ", ".join(f"`{n}`" for n in files.split(", ")) if files != "-" else "-", ours, theirs]
                  for what, cmd, files, ours, theirs in lines])



def _gap(worst: float, target: float, digits: int = 0) -> str:
    """'missed by N points': percentage points between the worst value and the target."""
    return f"missed by {100 * (worst - target):.{digits}f} points"


def targets_table() -> str:
    """docs/design.md#targets, each with what the files say: met, or missed with the gap at the worst point."""
    tp2 = [(paid(ms_by(n), t), paid_target(t, True), n) for n, at_4k in PAID if at_4k and "tuned" in n
           for t in sorted({t for t, _ in ms_by(n)}) if paid_target(t, True) is not None]
    shard = [(paid(ms_by(PAID[-1][0]), t), 0.0) for t in (8192, 16384)]
    p2p = [r["steal_ms"] / r["sm_bound_ms"] for n in INTERFERENCE for r in rows(n) if r["ctas"] <= 16]
    norm = [r["excess"] for r in rows("sm_share-norm-llama-qwen-tp2-tp8-shards-H200.jsonl")
            if r.get("kind") == "norm" and r["target"] == "off"]
    floor = [float(line.split(" | ")[-1].rstrip(" |")) for line in kernels_table().splitlines()[2:]
             if line.startswith("| p2p_fused |") and line.split(" | ")[2] == "8"]
    waves = [r["wave_vs_best"] for n in TUNE for r in rows(n) if r.get("kind") == "choice" and r.get("wave_vs_best") is not None]
    dense = [r["vs_dense"] for n in MOE[:2] for r in rows(n) if r["mode"] == "loop" and r["tokens"] >= 4096]
    route1 = [r["routing_share"] for n in MOE[:2] for r in rows(n) if r["mode"] == "loop" and r["tokens"] >= 4096]
    route8 = [r["routing_share"] for r in rows(MOE[2]) if r["tokens"] >= 2048]
    host = [r["host_over_gpu"] for r in rows("throughput-llama3-70b-tp1-shard-as-tp2-H200.jsonl")]

    def within(values, limit):
        met = sum(v <= limit for v in values)
        return "met" if met == len(values) else f"{met} of {len(values)} points met; worst {max(values):.2f}"

    body = [
        ["comm cost still paid, llama3-70b and qwen2.5-72b at TP=2 (2xH200, tuned runs)", "<= 10% at 4K, <= 0 from 8K",
         f"{span([100 * p for p, _, _ in tp2], '{:.0f}')}% at 4K-16K",
         "met" if all(p <= t for p, t, _ in tp2) else f"missed at {sum(p > t for p, t, _ in tp2)} of {len(tp2)} points, "
         f"by {span([100 * (p - t) for p, t, _ in tp2 if p > t], '{:.0f}')} points"],
        ["the same with weight shards of TP=8 on 2 GPUs", "<= 0 from 8K", f"{span([100 * p for p, _ in shard], '{:.0f}')}% at 8K-16K",
         "met" if all(p <= 0 for p, _ in shard) else f"missed by {span([100 * p for p, _ in shard], '{:.0f}')} points"],
        ["GEMMs beside the P2P kernel holding 8-16 CTAs (2xH200): extra time / SM-share bound", "<= 1.2", span(p2p, "{:.2f}"),
         within(p2p, 1.2)],
        ["GEMMs beside the CE norm kernel, k = 8 and 16 CTAs, no SM target (one H200): excess over the bound", "<= 1.2",
         span(norm, "{:.2f}"), within(norm, 1.2)],
        ["the fused P2P kernel at 8 CTAs vs its SM floor, 1K-32K tokens", "<= 1.1", span(floor, "{:.2f}"), within(floor, 1.1)],
        ["the wave rule's split vs the searched best, 4K-16K", "<= 1.01", span(waves, "{:.3f}"),
         "met" if max(waves) <= 1.01 else _gap(max(waves), 1.01, 1)],
        ["throughput gain over nccl within 3 points of nocomm's", "within 3 points", "not measured: needs 2 GPUs", "-"],
        ["MoE expert GEMMs vs a dense GEMM of the same rows per expert, from 4K (one H200, TP=1 shapes)", ">= 0.6",
         span(dense, "{:.2f}"), "met" if min(dense) >= 0.6 else "missed"],
        ["MoE router + permutation + un-permute share of the block, from 4K, TP=1 shapes", "< 10%",
         f"{span([100 * r for r in route1], '{:.1f}')}%", "met" if max(route1) < 0.10 else _gap(max(route1), 0.10)],
        ["the same at the TP=8 expert shards, 2K-16K", "< 10%", f"{span([100 * r for r in route8], '{:.1f}')}%",
         "met" if max(route8) < 0.10 else _gap(max(route8), 0.10)],
        ["serving engine host time per step / GPU time (one H200, TP=2 shards, 80 layers)", "< 5%",
         f"{span([100 * h for h in host], '{:.1f}')}%", "met" if max(host) < 0.05 else _gap(max(host), 0.05)],
    ]
    return table(["target (docs/design.md#targets)", "target", "measured", "status"], body)


def status_block() -> str:
    """The README's three status bullets, every number from the files."""
    from experiments.fidelity import HEADLINE, HEADLINE_TOKENS
    real = [f for s, _, f in HEADLINE if "EMULATED" not in s]
    emu = [f for s, _, f in HEADLINE if "EMULATED" in s]
    vs_nccl = [ms[(t, "nccl")] / ms[(t, "tokenweave")] for ms in map(ms_by, real) for t in HEADLINE_TOKENS if (t, "tokenweave") in ms]
    paid_all = [paid(ms, t) for ms in map(ms_by, real) for t in HEADLINE_TOKENS if (t, "tokenweave") in ms]
    vs_nocomm = [r["vs_nocomm"] for f in emu for r in rows(f) if r["strategy"] == "tokenweave"]
    paper = paper_times()
    theirs = [paper[(m, t)]["overlap_fused"] / paper[(m, t)]["no_ar"] for m in ("llama3-70b", "qwen2.5-72b") for t in HEADLINE_TOKENS]
    checked = [line.split(" | ")[-3:-1] for line in checks_table().splitlines()[2:]]
    total, ok = sum(int(c) for c, _ in checked), sum(int(p) for _, p in checked)
    return "\n".join([
        f"- **Correct.** Every strategy matches the float64 reference on 2, 4 and 8 CPU ranks (the tests) and on the "
        f"GPU: {ok} of {total} checked rows pass in {len(checked)} GPU result files ([correctness](docs/results.md#correctness)).",
        f"- **Slower than the paper.** On 2xH200 (TP=2, llama3-70b and qwen2.5-72b, 4K-32K) tokenweave is "
        f"{span(vs_nccl)}x faster than nccl but still pays {span([100 * p for p in paid_all], '{:.0f}')}% of the "
        f"communication's cost (target: at most 10% at 4K, 0 from 8K: missed); at EMULATED TP=8 it takes "
        f"{span(vs_nocomm)}x nocomm's time, where the paper reports {span(theirs)}x ([targets](docs/results.md#targets)).",
        "- **Limits.** No NVLink multicast on the lab machines (docs/design.md#rules): the paper's multimem kernel is "
        "compiled and PTX-checked, never run, and ours moves every byte through the SMs over P2P. No 4- or 8-GPU "
        "machine has been lent: TP=8 runs EMULATED on one GPU with nccl PROJECTED, and serving throughput on "
        "2 GPUs is not measured yet.",
    ])


def kernel_history_table() -> str:
    """The fused P2P kernel at 8 CTAs, 8K tokens, after each rewrite (experiments/figures.py KERNEL_HISTORY)."""
    from experiments.figures import KERNEL_HISTORY
    body = []
    for label, name in KERNEL_HISTORY:
        k = {r["kernel"]: r["time_us"] for r in rows(name) if r.get("hidden") == 8192 and r["tokens"] == 8192
             and r["kernel"] in ("p2p_fused", "nccl_ar") and r["ctas"] in (8, 0)}
        body.append([label, f"`{name}`", f"{k['p2p_fused']:.0f}", f"{k['p2p_fused'] / k['nccl_ar']:.2f}"])
    return table(["version", "file", "us at 8 CTAs, 8K tokens", "vs NCCL all-reduce in the same run"], body)
