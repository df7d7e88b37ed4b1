"""What the record adds up to: the targets table of docs/results.md, and the README's reproduce table
and status bullets (written by `python -m experiments.report`; every number from the files named)."""
from __future__ import annotations

import csv

from experiments.fidelity import PAPER_MODEL, paper_times
from experiments.record import E2E, KERNELS, PAID, PAPER_DIR, checks, gap, ms_by, paid, paid_target, rows, span, table
from experiments.record_parts import INTERFERENCE, MOE, TUNE, fused_kernel_rows


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



def _k(tokens) -> str:
    """Token counts as the tables write them: 4K, or 4K-32K for a range."""
    lo, hi = f"{min(tokens) // 1024}K", f"{max(tokens) // 1024}K"
    return lo if lo == hi else f"{lo}-{hi}"


# tokenweave / nocomm at EMULATED TP=8 (llama3-70b): the pulled kernel with the SM target, without and with
# the 355 GB/s link floor (experiments/decomposition.py has every lever).
EMULATED_TARGET_FILES = (("no link time", "latency-llama3-70b-emulated-tp8-pull-left-H200.jsonl"),
                         ("355 GB/s link floor", "latency-llama3-70b-emulated-tp8-pull-link355-wave-left-H200.jsonl"))


def emulated_target_rows() -> list[list[str]]:
    """The optimization target (<= 0.98 at 4K, <= 0.96 from 8K) against the best measured configuration."""
    from experiments.decomposition import ratios
    out = []
    for what, name in EMULATED_TARGET_FILES:
        tw = ratios(name, "tokenweave")
        gaps = [100 * (tw[t] - (0.98 if t == 4096 else 0.96)) for t in sorted(tw)]
        measured = " / ".join(f"{tw[t]:.3f}" for t in sorted(tw)) + f" at {_k(sorted(tw))}"
        status = "met" if max(gaps) <= 0 else f"missed at {sum(g > 0 for g in gaps)} of {len(gaps)} points, by " \
            f"{span([g for g in gaps if g > 0], '{:.1f}')} points"
        out.append([f"tokenweave / nocomm, EMULATED TP=8, llama3-70b, pull kernel, SM target left, {what} (`{name}`)",
                    "<= 0.98 at 4K, <= 0.96 from 8K", measured, status])
    return out


def targets_table() -> str:
    """docs/design.md#targets, each with what the files say: met, or missed with the gap at the worst point."""
    tp2 = [(paid(ms_by(n), t), paid_target(t, True), t) for n, at_4k in PAID if at_4k and "tuned" in n
           for t in sorted({t for t, _ in ms_by(n)}) if paid_target(t, True) is not None]
    shard = [(paid(ms_by(PAID[-1][0]), t), 0.0, t) for t in sorted({t for t, _ in ms_by(PAID[-1][0])}) if t >= 8192]
    p2p = [r["steal_ms"] / r["sm_bound_ms"] for n in INTERFERENCE for r in rows(n) if r["ctas"] <= 16]
    norm = [r["excess"] for r in rows("sm_share-norm-llama-qwen-tp2-tp8-shards-H200.jsonl")
            if r.get("kind") == "norm" and r["target"] == "off"]
    fused8 = fused_kernel_rows(kernels=("p2p_fused",), ctas=(8,))
    floor = [r["vs_floor"] for r in fused8]
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
         f"{span([100 * p for p, _, _ in tp2], '{:.0f}')}% at {_k([t for _, _, t in tp2])}",
         "met" if all(p <= t for p, t, _ in tp2) else f"missed at {sum(p > t for p, t, _ in tp2)} of {len(tp2)} points, "
         f"by {span([100 * (p - t) for p, t, _ in tp2 if p > t], '{:.0f}')} points"],
        ["the same with weight shards of TP=8 on 2 GPUs", "<= 0 from 8K",
         f"{span([100 * p for p, _, _ in shard], '{:.0f}')}% at {_k([t for _, _, t in shard])}",
         "met" if all(p <= 0 for p, _, _ in shard) else f"missed by {span([100 * p for p, _, _ in shard], '{:.0f}')} points"],
        ["GEMMs beside the P2P kernel holding 8-16 CTAs (2xH200): extra time / SM-share bound", "<= 1.2", span(p2p, "{:.2f}"),
         within(p2p, 1.2)],
        ["GEMMs beside the CE norm kernel, k = 8 and 16 CTAs, no SM target (one H200): excess over the bound", "<= 1.2",
         span(norm, "{:.2f}"), within(norm, 1.2)],
        [f"the fused P2P kernel at 8 CTAs vs its SM floor, {', '.join(_k([r['tokens']]) for r in fused8)} tokens", "<= 1.1",
         span(floor, "{:.2f}"), within(floor, 1.1)],
        ["the wave rule's split vs the searched best, 4K-16K", "<= 1.01", span(waves, "{:.3f}"),
         "met" if max(waves) <= 1.01 else gap(max(waves), 1.01, 1)],
        *emulated_target_rows(),
        ["throughput gain over nccl within 3 points of nocomm's", "within 3 points", "not measured: needs 2 GPUs", "-"],
        ["MoE expert GEMMs vs a dense GEMM of the same rows per expert, from 4K (one H200, TP=1 shapes)", ">= 0.6",
         span(dense, "{:.2f}"), "met" if min(dense) >= 0.6 else "missed"],
        ["MoE router + permutation + un-permute share of the block, from 4K, TP=1 shapes", "< 10%",
         f"{span([100 * r for r in route1], '{:.1f}')}%", "met" if max(route1) < 0.10 else gap(max(route1), 0.10)],
        ["the same at the TP=8 expert shards, 2K-16K", "< 10%", f"{span([100 * r for r in route8], '{:.1f}')}%",
         "met" if max(route8) < 0.10 else gap(max(route8), 0.10)],
        ["serving engine host time per step / GPU time (one H200, TP=2 shards, 80 layers)", "< 5%",
         f"{span([100 * h for h in host], '{:.1f}')}%", "met" if max(host) < 0.05 else gap(max(host), 0.05)],
    ]
    return table(["target (docs/design.md#targets)", "target", "measured", "status"], body)


def status_block() -> str:
    """The README's three status bullets, every number from the files."""
    from experiments.fidelity import HEADLINE, HEADLINE_TOKENS
    real = [f for s, _, f in HEADLINE if "EMULATED" not in s]
    emu = [f for s, _, f in HEADLINE if "EMULATED" in s]
    vs_nccl = [ms[(t, "nccl")] / ms[(t, "tokenweave")] for ms in map(ms_by, real) for t in HEADLINE_TOKENS if (t, "tokenweave") in ms]
    paid_all = [paid(ms, t) for ms in map(ms_by, real) for t in HEADLINE_TOKENS if (t, "tokenweave") in ms]
    vs_nocomm = [r["vs_nocomm"] for f in emu for r in rows(f) if r["strategy"] == "tokenweave" and r["tokens"] in HEADLINE_TOKENS]
    measured = [t for ms in map(ms_by, real) for t in HEADLINE_TOKENS if (t, "tokenweave") in ms]
    paper = paper_times()
    theirs = [paper[(m, t)]["overlap_fused"] / paper[(m, t)]["no_ar"] for m in ("llama3-70b", "qwen2.5-72b") for t in HEADLINE_TOKENS]
    checked = checks()
    total, ok = sum(c["checked"] for c in checked), sum(c["passed"] for c in checked)
    return "\n".join([
        f"- **Correct.** Every strategy matches the float64 reference on 2, 4 and 8 CPU ranks (the tests) and on the "
        f"GPU: {ok} of {total} checked rows pass in {len(checked)} GPU result files ([correctness](docs/results.md#correctness)).",
        f"- **Slower than the paper.** On 2xH200 (TP=2, llama3-70b and qwen2.5-72b, {_k(measured)}) tokenweave is "
        f"{span(vs_nccl)}x faster than nccl but still pays {span([100 * p for p in paid_all], '{:.0f}')}% of the "
        f"communication's cost (target: at most 10% at 4K, 0 from 8K: missed); at EMULATED TP=8 it takes "
        f"{span(vs_nocomm)}x nocomm's time, where the paper reports {span(theirs)}x ([targets](docs/results.md#targets)).",
        "- **Limits.** No NVLink multicast on the lab machines (docs/design.md#rules): the paper's multimem kernel is "
        "compiled and PTX-checked, never run, and ours moves every byte through the SMs over P2P. No 4- or 8-GPU "
        "machine has been lent: TP=8 runs EMULATED on one GPU with nccl PROJECTED, and serving throughput on "
        "2 GPUs is not measured yet.",
    ])


