"""GEMMs beside busy SMs (experiments/sm_share.py's rows), registered in experiments/figures.py as
`sm_share`: the excess over the SM-share bound, (slowdown - 1) / (bound - 1), of every layer GEMM point
(llama3-70b and qwen2.5-72b, TP=2 and TP=8 shard shapes, M = 1K / 4K / 16K), per k busy SMs and SM-count
target, for what runs beside: k held SMs (spinning CTAs), the same held as 2-CTA clusters (pairs), and
the copy-engine transport's real k-CTA norm kernel. One dot per point, a bar at the median, the 1.2x
target as a dashed line. The held rows come from the file that also holds the pairs (one run)."""
from __future__ import annotations

from pathlib import Path

KINDS = (("held", "held SMs (single CTAs)", "tab:red"), ("pairs", "held SMs as 2-CTA clusters", "tab:orange"),
         ("norm", "CE norm kernel (k CTAs)", "tab:blue"))


def fig_sm_share(paths: list[Path], out_dir: Path):
    """paths: (the file with held + norm rows, the file with held + pairs rows)."""
    import numpy as np

    from experiments.figures import _plt, _save, load
    plt = _plt()
    norm_file, pairs_file = paths
    rows = [r for r in load(norm_file) if r["kind"] == "norm"] + \
        [r for r in load(pairs_file) if r["kind"] in ("held", "pairs")]
    groups = sorted({(r["held"], r["target"]) for r in rows}, key=lambda g: (g[0], g[1] != "off"))
    fig, ax = plt.subplots(figsize=(9, 3.8))
    rng = np.random.default_rng(0)   # jitter only
    width = 0.8 / len(KINDS)
    for i, (kind, label, color) in enumerate(KINDS):
        for j, (k, target) in enumerate(groups):
            ex = np.array([r["excess"] for r in rows if r["kind"] == kind and r["held"] == k and r["target"] == target])
            if not len(ex):
                continue
            x = j + (i - 1) * width
            ax.scatter(x + rng.uniform(-width / 3, width / 3, len(ex)), np.maximum(ex, 0.01), s=8, color=color,
                       alpha=0.6, label=label if j == 0 else None)
            ax.hlines(np.median(ex), x - width / 2, x + width / 2, color="k", lw=1.5)
            ax.annotate(f"{np.sum(ex <= 1.2)}/{len(ex)}", (x, 0.012), ha="center", fontsize=6)
    ax.axhline(1.2, color="g", ls="--", lw=0.8, label="target: <= 1.2x the SM-share bound")
    ax.axhline(1.0, color="gray", ls=":", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)), [f"k = {k}, target {t}" for k, t in groups])
    ax.set_ylabel("excess over the SM-share bound")
    ax.set_title("layer GEMMs beside k busy SMs: one dot per (model, shard, GEMM, M); bar = median; "
                 "n/N = points within 1.2x; excess <= 0 (noise) drawn at 0.01", fontsize=8)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4, frameon=False)
    meta = rows[0]
    fig.suptitle(f"{meta['gpu']}: {norm_file.name} (norm), {pairs_file.name} (held, pairs)", fontsize=8)
    return _save(fig, "sm_share", out_dir)
