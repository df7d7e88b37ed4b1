"""Where tokenweave's time goes on the emulated TP=8 rank, and what each lever moved: tables for
docs/results.md (experiments/report.py blocks `decomposition` and `levers`) and the figure
`decomposition` (experiments/figures.py), all from the files named below.

Every number is a ratio to nocomm's time in the same file (the same run, timed round-robin). The runs
are EMULATED (one process plays rank 0 of TP=8 over stand-in peers, docs/design.md#emulation); the
`--emulate-comm` runs are DECOMPOSITION runs whose outputs are not the model's:
  none  fused steps skipped: no comm, no norm (the floor; the norm's whole share is 1 - fused's ratio);
  norm  fused steps run only their 1/8 add + norm on the kernel's CTAs, no peer bytes;
  full  the fused comm kernel (pushed partials).
Terms, in points (100 x the ratio's difference): split = tokenweave(none) - fused(none); norm in
tokenweave = tokenweave(norm) - tokenweave(none); bytes = tokenweave(full) - tokenweave(norm).
"""
from __future__ import annotations

from pathlib import Path

from experiments.record import rows, table

TOKENS = (4096, 8192, 16384, 32768)
MODE_FILES = {m: f"latency-llama3-70b-emulated-tp8-comm-{m}-H200.jsonl" for m in ("none", "norm", "full")}
PULL_FILE = "latency-llama3-70b-emulated-tp8-pull-H200.jsonl"
# (what changed, file): tokenweave / nocomm of llama3-70b at emulated TP=8, 4 layers, CUDA graphs.
LEVERS = (
    ("push kernel, 8 CTAs, wave split (baseline)", MODE_FILES["full"]),
    ("pull kernel", PULL_FILE),
    ("pull, 4 CTAs", "latency-llama3-70b-emulated-tp8-pull-ctas4-H200.jsonl"),
    ("pull, 16 CTAs", "latency-llama3-70b-emulated-tp8-pull-ctas16-H200.jsonl"),
    ("pull, SM target left (124)", "latency-llama3-70b-emulated-tp8-pull-left-H200.jsonl"),
    ("norm only, SM target left", "latency-llama3-70b-emulated-tp8-norm-left-H200.jsonl"),
    ("pull, tuned on the emulated rank (no link time)", "latency-llama3-70b-emulated-tp8-pull-tuned-H200.jsonl"),
    ("push, 355 GB/s link floor, SM target left", "latency-llama3-70b-emulated-tp8-push-link355-wave-left-H200.jsonl"),
    ("pull, 355 GB/s link floor, SM target left", "latency-llama3-70b-emulated-tp8-pull-link355-wave-left-H200.jsonl"),
)


def ratios(name: str, strategy: str) -> dict[int, float]:
    """{tokens: vs_nocomm} of a strategy in one latency file (its median_ms / nocomm's, same run)."""
    return {r["tokens"]: r["vs_nocomm"] for r in rows(name) if r["strategy"] == strategy}


POINTS = ("split", "norm in tokenweave", "norm in fused (exposed)", "bytes, push", "bytes, pull")  # not ratios


def terms() -> dict[str, dict[int, float]]:
    """The decomposition's ratios and terms (points), per token count."""
    fz, tz = ratios(MODE_FILES["none"], "fused"), ratios(MODE_FILES["none"], "tokenweave")
    fn, tn = ratios(MODE_FILES["norm"], "fused"), ratios(MODE_FILES["norm"], "tokenweave")
    tf, tp = ratios(MODE_FILES["full"], "tokenweave"), ratios(PULL_FILE, "tokenweave")
    pts = lambda a, b: {t: 100 * (a[t] - b[t]) for t in TOKENS}  # noqa: E731
    return {"fused, no comm, no norm": fz, "tokenweave, no comm, no norm": tz, "split": pts(tz, fz),
            "fused, 1/8 norm only": fn, "tokenweave, 1/8 norm only": tn,
            "norm in tokenweave": pts(tn, tz), "norm in fused (exposed)": pts(fn, fz),
            "tokenweave, push kernel": tf, "bytes, push": pts(tf, tn),
            "tokenweave, pull kernel": tp, "bytes, pull": pts(tp, tn)}


def decomposition_table() -> str:
    body = [[name + " (points)", *(f"{v[t]:+.1f}" for t in TOKENS)] if name in POINTS else
            [name, *(f"{v[t]:.3f}" for t in TOKENS)] for name, v in terms().items()]
    files = ", ".join(f"`{f}`" for f in (*MODE_FILES.values(), PULL_FILE))
    return table(["EMULATED TP=8, llama3-70b, ms / nocomm", "4K", "8K", "16K", "32K"], body) + f"\n\nFiles: {files}."


def levers_table() -> str:
    body = []
    for what, name in LEVERS:
        tw = ratios(name, "tokenweave")
        body.append([what, *(f"{tw[t]:.3f}" if t in tw else "-" for t in TOKENS), f"`{name}`"])
    return table(["EMULATED TP=8, llama3-70b: tokenweave / nocomm", "4K", "8K", "16K", "32K", "file"], body)


# ---- the figure -------------------------------------------------------------------------------------------

FIGURE_FILES = (*MODE_FILES.values(), PULL_FILE)


def fig_decomposition(paths: list[Path], out_dir: Path):
    """Stacked bars per token count: the floor (fused, no comm, no norm), the split, the norm in
    tokenweave, the push kernel's bytes; a marker where the pull kernel lands; nocomm at 1.0."""
    import numpy as np

    from experiments.figures import _plt, _save
    del paths   # terms() reads the same FIGURE_FILES (figures.py checked they exist and hold GPU rows)
    plt = _plt()
    t = terms()
    x = np.arange(len(TOKENS))
    fig, ax = plt.subplots(figsize=(7.5, 4))
    bottom = np.array([t["fused, no comm, no norm"][k] for k in TOKENS])
    ax.bar(x, bottom, 0.6, color="0.8", label="fused, comm and norm skipped (floor)")
    for name, color in (("split", "tab:orange"), ("norm in tokenweave", "tab:blue"), ("bytes, push", "tab:red")):
        h = np.array([t[name][k] / 100 for k in TOKENS])
        ax.bar(x, h, 0.6, bottom=bottom, color=color, label=f"+ {name}")
        bottom = bottom + h
    ax.scatter(x, [t["tokenweave, pull kernel"][k] for k in TOKENS], marker="D", color="k", zorder=3,
               label="tokenweave with the pull kernel")
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="nocomm")
    ax.set_xticks(x, [f"{k // 1024}K" for k in TOKENS])
    ax.set_ylim(0.85, max(1.2, bottom.max() + 0.02))
    ax.set_xlabel("tokens per batch")
    ax.set_ylabel("time / nocomm")
    ax.set_title("EMULATED TP=8 rank (llama3-70b, 4 layers, one H200): where tokenweave's time goes", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, "decomposition", out_dir)
