"""The measured record, part by part: the fused kernel and the SMs it uses, interference, the split,
MoE, the serving engine's host time, the overhead ablation and attention (tables of docs/results.md,
written by `python -m experiments.report`; each computed from the result files it names)."""
from __future__ import annotations

import statistics
from collections import defaultdict

from experiments.record import KERNELS, gap, rows, span, table

# ---- the fused kernel, the SMs, interference ---------------------------------------------------------

def fused_kernel_rows(kernels=("p2p_fused", "p2p_ar"), tokens=(1024, 8192, 32768), ctas=(8, 16, 32, 132)) -> list[dict]:
    """The two-shot P2P rows of KERNELS (hidden 8192, TP=2), each with `nccl_us` (NCCL's all-reduce alone at
    the same size, same run) and `vs_floor`: the time over bytes through this rank's SMs / (CTAs x the
    per-SM copy rate), as experiments/kernels.py defines them (sm_bytes, per_sm_gbps)."""
    from experiments.kernels import per_sm_gbps, sm_bytes
    rs = [r for r in rows(KERNELS) if r["hidden"] == 8192]
    nccl = {r["tokens"]: r["time_us"] for r in rs if r["kernel"] == "nccl_ar"}
    per_sm, _ = per_sm_gbps()
    return [{**r, "nccl_us": nccl[r["tokens"]],
             "vs_floor": r["time_us"] * r["ctas"] * per_sm * 1e3 / sm_bytes(r["kernel"], r["tokens"], r["hidden"], r["tp"])}
            for r in sorted(rs, key=lambda r: (r["kernel"], r["tokens"], r["ctas"]))
            if r["kernel"] in kernels and r["tokens"] in tokens and r["ctas"] in ctas and not r.get("oneshot")]


def kernels_table() -> str:
    """p2p_fused and p2p_ar against NCCL's all-reduce alone, and against their SM floor."""
    return table(["kernel", "tokens", "CTAs", "us", "NCCL all-reduce us", "vs NCCL", "algbw GB/s", "vs SM floor"],
                 [[r["kernel"], r["tokens"], r["ctas"], f"{r['time_us']:.0f}", f"{r['nccl_us']:.0f}",
                   f"{r['time_us'] / r['nccl_us']:.2f}", f"{r['algbw_gbps']:.0f}", f"{r['vs_floor']:.2f}"]
                  for r in fused_kernel_rows()])


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
                             "met" if w <= 1.01 else gap(w, 1.01, 1)])
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


def kernel_history_table() -> str:
    """The fused P2P kernel at 8 CTAs, 8K tokens, after each rewrite (experiments/figures.py KERNEL_HISTORY)."""
    from experiments.figures import KERNEL_HISTORY
    body = []
    for label, name in KERNEL_HISTORY:
        k = {r["kernel"]: r["time_us"] for r in rows(name) if r.get("hidden") == 8192 and r["tokens"] == 8192
             and r["kernel"] in ("p2p_fused", "nccl_ar") and r["ctas"] in (8, 0)}
        body.append([label, f"`{name}`", f"{k['p2p_fused']:.0f}", f"{k['p2p_fused'] / k['nccl_ar']:.2f}"])
    return table(["version", "file", "us at 8 CTAs, 8K tokens", "vs NCCL all-reduce in the same run"], body)
