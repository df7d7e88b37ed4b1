"""The emulated rank against the committed 2xH200 files: one markdown table per compared quantity,
every number read from the named result files (docs/hardware.md#emulation-fidelity prints them).

    python -m experiments.fidelity            # prints the tables

ratio = real / emulated. Target (docs/design.md#targets): within 0.8-1.25, or explained.
"""
from __future__ import annotations

from tw.measure.results import RESULTS_DIR, read

REAL_KERNELS = "kernels-H200x2-warp-per-row.jsonl"
EMU_KERNELS = ("kernels-emulated-tp2-H200.jsonl", "kernels-emulated-tp2-link355-H200.jsonl")
REAL_INTERFERENCE = "interference-llama3-70b-tp2-H200.jsonl"
EMU_INTERFERENCE = "interference-llama3-70b-emulated-tp2-private-out-H200.jsonl"
E2E = (("latency-llama3-70b-tp2-H200-e2e-tuned.jsonl", "llama3-70b TP=2", (
            ("latency-llama3-70b-emulated-tp2-real-choices-H200.jsonl", "emulated TP=2"),
            ("latency-llama3-70b-emulated-tp2-privatex1-real-choices-H200.jsonl", "+ private x"),
            ("latency-llama3-70b-emulated-tp2-link355-privatex0-real-choices-H200.jsonl", "+ 355 GB/s link"),
            ("latency-llama3-70b-emulated-tp2-link355-privatex1-real-choices-H200.jsonl", "+ link + private x"))),
       ("latency-llama3-70b-shard-as-tp8-on-tp2-H200-tuned.jsonl", "llama3-70b, TP=8 shards on 2 GPUs", (
            ("latency-llama3-70b-emulated-tp8-shard8-choices-H200.jsonl", "emulated TP=8"),)))


def _ratio(real, emu) -> str:
    if real is None or emu is None:
        return "-"
    if abs(emu) < 1e-9:
        return "inf"
    return f"{real / emu:.2f}"


def kernels_table() -> list[str]:
    real = {(r["kernel"], r["tokens"], r["ctas"]): r["time_us"] for r in read(RESULTS_DIR / REAL_KERNELS)
            if r["hidden"] == 8192}
    emus = [{(r["kernel"], r["tokens"], r["ctas"]): r["time_us"] for r in read(RESULTS_DIR / f)} for f in EMU_KERNELS]
    lines = [f"Fused kernel (p2p_fused, hidden 8192, TP=2), us: real `{REAL_KERNELS}`, emulated `{EMU_KERNELS[0]}`, "
             f"with link floor `{EMU_KERNELS[1]}`", "",
             "| rows | CTAs | real | emulated | real/emulated | emulated + 355 GB/s link | real/(+link) |",
             "|---|---|---|---|---|---|---|"]
    for key in sorted(k for k in emus[0] if k[0] == "p2p_fused"):
        _, n, c = key
        r, e, el = real.get(key), emus[0].get(key), emus[1].get(key)
        lines.append(f"| {n} | {c} | {r if r is not None else '-'} | {e} | {_ratio(r, e)} | "
                     f"{el if el is not None else '-'} | {_ratio(r, el)} |")
    return lines


def interference_table() -> list[str]:
    real = {(r["tokens"], r["ctas"]): r for r in read(RESULTS_DIR / REAL_INTERFERENCE)}
    emu = {(r["tokens"], r["ctas"]): r for r in read(RESULTS_DIR / EMU_INTERFERENCE)}
    lines = [f"GEMMs beside the fused kernel (llama3-70b TP=2 layer GEMMs, private out), ms: real `{REAL_INTERFERENCE}`,"
             f" emulated `{EMU_INTERFERENCE}`", "",
             "| rows | CTAs | gemm_ov real | emulated | ratio | comm_ms real | emulated | ratio | steal real | emulated |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(emu):
        r, e = real.get(key), emu[key]
        if r is None:
            continue
        lines.append(f"| {key[0]} | {key[1]} | {r['gemm_ov_ms']:.3f} | {e['gemm_ov_ms']:.3f} | "
                     f"{_ratio(r['gemm_ov_ms'], e['gemm_ov_ms'])} | {r['comm_ms']:.3f} | {e['comm_ms']:.3f} | "
                     f"{_ratio(r['comm_ms'], e['comm_ms'])} | {r['steal_ms']:.3f} | {e['steal_ms']:.3f} |")
    return lines


def _excess(path) -> dict:
    """{(tokens, strategy): ms - nocomm's ms} of one latency file."""
    rows = list(read(RESULTS_DIR / path))
    bound = {r["tokens"]: r["median_ms"] for r in rows if r["strategy"] == "nocomm"}
    return {(r["tokens"], r["strategy"]): r["median_ms"] - bound[r["tokens"]] for r in rows if r["tokens"] in bound}


def e2e_table() -> list[str]:
    lines = []
    for real_file, what, emus in E2E:
        real = _excess(real_file)
        emu = [(label, _excess(f), f) for f, label in emus]
        lines += [f"{what}: strategy - nocomm (ms, 4 layers, graphs, the real file's own split and CTA budgets); "
                  f"real `{real_file}`; " + "; ".join(f"{label} `{f}`" for label, _, f in emu), "",
                  "| tokens | strategy | real | " + " | ".join(label for label, _, _ in emu) + " |",
                  "|---|---|---|" + "---|" * len(emu)]
        for key in sorted(k for k in emu[0][1] if k[1] != "nocomm"):
            cells = [f"{e.get(key, float('nan')):.2f}" for _, e, _ in emu]
            lines.append(f"| {key[0]} | {key[1]} | {real[key]:.2f} | " + " | ".join(cells) + " |"
                         if key in real else f"| {key[0]} | {key[1]} | - | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


HEADLINE = (  # (setting, model, file): the 2xH200 runs, then the EMULATED TP=8 rank on one H200
    ("2xH200, TP=2", "llama3-70b", "latency-llama3-70b-tp2-H200-e2e-tuned.jsonl"),
    ("2xH200, TP=2", "qwen2.5-72b", "latency-qwen2.5-72b-tp2-H200-tuned.jsonl"),
    ("1xH200, EMULATED TP=8, pull kernel, 355 GB/s link floor", "llama3-70b",
     "latency-llama3-70b-emulated-tp8-pull-link355-wave-left-H200.jsonl"),
    ("1xH200, EMULATED TP=8, push kernel", "qwen2.5-72b", "latency-qwen2.5-72b-emulated-tp8-H200.jsonl"))
HEADLINE_TOKENS = (4096, 16384, 32768)


PAPER_MODEL = {"llama3-70b": "Llama-3.3-70B-Instruct", "qwen2.5-72b": "Qwen2.5-72B-Instruct",
               "mixtral-8x22b": "Mixtral-8x22B-Instruct-v0.1"}   # our preset -> the paper's model column


def paper_times(path=None) -> dict:
    """{(our model name, prompt tokens): {baseline_multimem, no_ar, overlap_fused: ms}} from the paper's
    figure_11a.csv copy (8xH100, TP=8, one prompt, 80 layers, eager)."""
    import csv

    from tw.comm.emulation import PAPER_DIR
    ours = {v: k for k, v in PAPER_MODEL.items()}
    with open(path or PAPER_DIR / "figure_11a.csv") as f:
        return {(ours[r["model"]], int(r["prompt_len"])): {k: float(r[k]) for k in ("baseline_multimem", "no_ar", "overlap_fused")}
                for r in csv.DictReader(f)}


def baseline_table() -> str:
    """The README's headline: tokenweave against nccl and against nocomm, on 2xH200 (TP=2) and on the
    EMULATED TP=8 rank (whose nccl is PROJECTED, never run), beside the paper's figure_11a.csv (8xH100,
    80 layers, eager, its baseline on multimem: not the same setting, named so). 4 layers, CUDA graphs."""
    paper = paper_times()
    lines = ["| setting | model | tokens | tokenweave vs nccl | nocomm vs nccl | tokenweave / nocomm "
             "| paper: tokenweave vs baseline | paper: tokenweave / no_ar | file |", "|---|---|---|---|---|---|---|---|---|"]
    for setting, model, f in HEADLINE:
        ms = {(r["tokens"], r["strategy"]): r for r in read(RESULTS_DIR / f)}
        for tokens in HEADLINE_TOKENS:
            if (tokens, "tokenweave") not in ms:
                continue
            tw, nocomm = ms[(tokens, "tokenweave")], ms[(tokens, "nocomm")]
            if "EMULATED" in setting:
                vs_nccl = [f"{r['projected_speedup_vs_nccl']:.3f} PROJECTED" for r in (tw, nocomm)]
            else:
                vs_nccl = [f"{ms[(tokens, 'nccl')]['median_ms'] / r['median_ms']:.3f}" for r in (tw, nocomm)]
            p = paper[(model, tokens)]
            lines.append(f"| {setting} | {model} | {tokens} | {vs_nccl[0]} | {vs_nccl[1]} | "
                         f"{tw['median_ms'] / nocomm['median_ms']:.3f} | {p['baseline_multimem'] / p['overlap_fused']:.3f} | "
                         f"{p['overlap_fused'] / p['no_ar']:.3f} | `{f}` |")
    return "\n".join(lines)


def tables() -> str:
    return "\n".join(kernels_table() + [""] + interference_table() + [""] + e2e_table())


if __name__ == "__main__":
    print(tables())
    print()
    print(baseline_table())
