"""Regenerate every figure from the result files in experiments/results/ (and nothing else).

    python -m experiments.figures                       # -> experiments/figures/*.png and *.pdf
    python -m experiments.figures --out-dir /tmp/f --only kernels split

Each figure reads only the committed result file(s) FIGURE_FILES names for it (never the newest file
matching a pattern: a CPU run must not replace a figure's numbers), drops CPU-fallback rows (`device`
"cpu" or `gpu` "none ..."), and names its file and the hardware in its title. Where the paper states a
number for the same quantity, it is drawn beside ours from PAPER below (typed in with its source);
the paper's plots are not digitized, so most figures carry only its stated headline numbers.
A figure whose file is missing, empty or CPU-only, or that fails to draw, is reported by name and
makes main() return 1 (the other figures are still drawn).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from experiments.figures_moe import fig_moe
from experiments.figures_sm_share import fig_sm_share
from experiments.decomposition import FIGURE_FILES as DECOMPOSITION_FILES, fig_decomposition
from tw.measure.results import RESULTS_DIR, read

FIG_DIR = Path(__file__).resolve().parent / "figures"

# Numbers the paper states in its text (not read off its plots), with where they come from.
PAPER = {
    "latency_speedup_max": (1.29, "arXiv 2505.11329v1 abstract: 'up to 29% latency gains' (8xH100)"),
    "latency_speedup_max_v5": (1.28, "arXiv 2505.11329v5 abstract: 'up to 1.28x' (8xH100)"),
    "comm_overhead_max": (0.20, "arXiv 2505.11329 abstract: 'overheads of up to 20%' over NVLink"),
    "comm_sms": ((2, 8), "arXiv 2505.11329 abstract: communication + RMSNorm with 2-8 SMs"),
}


def is_cpu_row(r: dict) -> bool:
    """A CPU-fallback measurement (timings say nothing about GPUs): never drawn or quoted."""
    return r.get("device") == "cpu" or str(r.get("gpu", "")).startswith("none")


def _check_file(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"result file {path} is missing")
    if path.stat().st_size == 0:
        raise ValueError(f"result file {path} is empty")
    return path


def load(path) -> list[dict]:
    """The GPU rows of a result file; raises (naming the file) if it is missing, empty or CPU-only."""
    rows = read(_check_file(path))
    keep = [r for r in rows if not is_cpu_row(r)]
    if not keep:
        raise ValueError(f"result file {path} is empty" if not rows else
                         f"result file {path} has only CPU-fallback rows ({len(rows)} ignored)")
    return keep


def trace_meta(csv_path) -> dict:
    """The run metadata stored beside a trace CSV (`otherData` of its Chrome-trace .json), or {}."""
    js = Path(csv_path).with_suffix(".json")
    return json.loads(js.read_text()).get("otherData", {}) if js.is_file() else {}


def load_trace(csv_path) -> list[dict]:
    """A trace CSV's rows; raises if it is missing, empty or from a CPU-fallback run."""
    from tw.measure.trace import read_csv
    if is_cpu_row(trace_meta(_check_file(csv_path))):
        raise ValueError(f"trace {csv_path} comes from a CPU-fallback run")
    rows = read_csv(csv_path)
    if not rows:
        raise ValueError(f"trace {csv_path} is empty")
    return rows


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, name: str, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    for p in paths:
        fig.savefig(p, bbox_inches="tight", dpi=130)
    _plt().close(fig)
    return paths


def fig_latency(path: Path, out_dir: Path, name: str = "latency_speedup"):
    """Paper Fig. 11 analogue: end-to-end speedup over nccl per strategy and token count."""
    plt = _plt()
    rows = load(path)
    strategies = [s for s in dict.fromkeys(r["strategy"] for r in rows) if s != "nccl"]
    tokens = sorted({r["tokens"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / max(1, len(strategies))
    for i, s in enumerate(strategies):
        sp = [next((r["speedup_vs_nccl"] for r in rows if r["tokens"] == t and r["strategy"] == s), 0)
              for t in tokens]
        ax.bar([j + i * width for j in range(len(tokens))], sp, width, label=s)
    ax.axhline(1.0, color="k", lw=0.8)
    v, src = PAPER["latency_speedup_max"]
    ax.axhline(v, color="r", ls="--", lw=0.8, label=f"paper: up to {v}x (8xH100)")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tokens))], [str(t) for t in tokens])
    ax.set_xlabel("tokens per batch")
    ax.set_ylabel("speedup vs nccl")
    r0 = rows[0]
    splits = {r["split_source"] for r in rows if r["strategy"] == "tokenweave" and r.get("split_source")}
    ax.set_title(f"{r0['model']}, {r0['layers']} layers, TP={r0['tp']}"
                 f"{', shards as TP=' + str(r0['shard_as_tp']) if r0.get('shard_as_tp') else ''}"
                 f" on {r0['world_size']}x {r0['gpu']}\n{path.name}"
                 f"{'  (tokenweave split: ' + ', '.join(sorted(splits)) + ')' if splits else ''}", fontsize=9)
    ax.set_ylim(0.7, max(1.35, ax.get_ylim()[1]))
    ax.legend(fontsize=7, ncol=3)
    return _save(fig, name, out_dir)


def fig_kernels(path: Path, out_dir: Path):
    """Paper Table 1 / Fig. 4-7 analogue: time of each AR(+norm) variant vs tokens, and the CTA sweep."""
    plt = _plt()
    rows = [r for r in load(path) if r.get("hidden") == 8192]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    main_ctas = {r["ctas"] for r in rows if r["kernel"] == "p2p_fused"}
    ctas = 8 if 8 in main_ctas else min(main_ctas)
    for k in dict.fromkeys(r["kernel"] for r in rows):
        pts = sorted((r["tokens"], r["time_us"]) for r in rows if r["kernel"] == k
                     and (r["transport"] == "nccl" or r["ctas"] == ctas))
        if pts:
            a1.plot(*zip(*pts), marker="o", ms=3, label=k)
    a1.set_xscale("log", base=2)
    a1.set_yscale("log")
    a1.set_xlabel("tokens (hidden 8192, bf16)")
    a1.set_ylabel("time (us)")
    a1.set_title(f"P2P kernels at {ctas} CTAs vs NCCL\n{path.name}", fontsize=9)
    a1.legend(fontsize=6)
    for k in ("p2p_fused", "p2p_ar"):
        for t in sorted({r["tokens"] for r in rows if r["kernel"] == k}):
            pts = sorted((r["ctas"], r["algbw_gbps"]) for r in rows if r["kernel"] == k and r["tokens"] == t)
            if len(pts) > 2:
                a2.plot(*zip(*pts), marker="o", ms=3, label=f"{k} {t} tok")
    a2.set_xscale("log", base=2)
    a2.set_xlabel("CTAs")
    a2.set_ylabel("algbw (GB/s)")
    lo, hi = PAPER["comm_sms"][0]
    a2.axvspan(lo, hi, color="g", alpha=0.1, label="paper: 2-8 SMs (multimem)")
    a2.set_title(f"CTA sweep, {rows[0]['world_size']}x {rows[0]['gpu']}", fontsize=9)
    a2.legend(fontsize=6)
    return _save(fig, "kernels", out_dir)


def fig_attention(path: Path, out_dir: Path):
    """Our attention kernels vs torch SDPA (not a paper figure; issue-2 target)."""
    plt = _plt()
    rows = load(path)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    keys = sorted({(r["seqs"], r["num_heads"], r["num_kv_heads"]) for r in rows})
    for impl in dict.fromkeys(r["impl"] for r in rows):
        for j, key in enumerate(keys):
            pts = sorted((r["tokens"], r["tflops"]) for r in rows if r["impl"] == impl
                         and (r["seqs"], r["num_heads"], r["num_kv_heads"]) == key)
            if pts and key == keys[0]:
                ax.plot(*zip(*pts), marker="o", ms=3, label=impl)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens (causal prefill, head_dim 128)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"attention, {keys[0][0]} seq, {keys[0][1]}/{keys[0][2]} heads, {rows[0]['gpu']}\n{path.name}",
                 fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, "attention", out_dir)


def fig_split(path: Path, out_dir: Path):
    """Paper Fig. 9 analogue: end-to-end tokenweave time vs split point (relative to the searched best),
    one panel per token count, the wave rule's pick, the naive T/2 and the search's best marked."""
    plt = _plt()
    rows = load(path)
    tokens = [t for t in sorted({r["tokens"] for r in rows})
              if any(r["tokens"] == t and r["kind"] == "split" for r in rows)]
    fig, axes = plt.subplots(1, len(tokens), figsize=(3.6 * len(tokens), 3.3), sharey=True, squeeze=False)
    for ax, t in zip(axes[0], tokens):
        pts = sorted((r["split_at"], r["median_ms"]) for r in rows if r["tokens"] == t and r["kind"] == "split")
        best = min(ms for _, ms in pts)
        ax.plot([s for s, _ in pts], [ms / best for _, ms in pts], marker="o", ms=3, color="0.4",
                label="end to end, every point")
        choice = next(r for r in rows if r["tokens"] == t and r["kind"] == "choice")
        ax.plot([choice["split_at"]], [choice["median_ms"] / best], "r*", ms=11, label="wave rule's pick")
        ax.plot([t // 2], [choice["naive_split_ms"] / best], "ks", ms=6, label="naive (T/2)")
        if "best_split" in choice:
            ax.plot([choice["best_split"]], [choice["best_split_ms"] / best], "g^", ms=8, label="searched best")
        if "shortlist" in choice:
            ax.plot([choice["shortlist_best"]], [choice["shortlist_ms"] / best], "mo", ms=10, mfc="none",
                    label=f"best of the rule's top {len(choice['shortlist'])}")
        ax.axhline(1.02, color="r", ls=":", lw=0.8)
        ax.set_title(f"{t} tokens (best {best:.2f} ms)", fontsize=8)
        ax.set_xlabel("split point s (tokens in half A)")
    axes[0][0].set_ylabel("forward time / searched best")
    axes[0][0].legend(fontsize=7)
    r0 = rows[0]
    fig.suptitle(f"tokenweave split search, {r0['model']}, {r0['layers']} layers, {r0['world_size']}x {r0['gpu']}"
                 f" (dotted: 2% target)  ({path.name})", fontsize=8)
    fig.tight_layout()
    return _save(fig, "split", out_dir)


def fig_interference(path: Path, out_dir: Path, name: str = "interference"):
    """What the fused kernel's CTAs cost the GEMMs they overlap (experiments/interference.py): the
    pair's extra time over the GEMMs alone (exposed), against the SM-share bound and the comm alone."""
    plt = _plt()
    rows = load(path)
    tokens = sorted({r["tokens"] for r in rows})
    ctas = sorted({r["ctas"] for r in rows})
    fig, axes = plt.subplots(1, len(tokens), figsize=(3.2 * len(tokens), 3.2), sharey=True, squeeze=False)
    for ax, t in zip(axes[0], tokens):
        rs = {r["ctas"]: r for r in rows if r["tokens"] == t}
        x = range(len(ctas))
        pct = lambda key: [100 * rs[k][key] / rs[k]["gemm_ms"] for k in ctas]  # noqa: E731
        ax.bar([i - 0.27 for i in x], pct("comm_ms"), 0.27, color="0.75", label="comm alone")
        ax.bar(list(x), pct("exposed_ms"), 0.27, color="tab:red", label="exposed (overlapped)")
        ax.bar([i + 0.27 for i in x], pct("sm_bound_ms"), 0.27, color="tab:blue", label="SM-share bound")
        ax.set_xticks(list(x), [str(k) for k in ctas])
        ax.set_xlabel("fused-kernel CTAs")
        ax.set_title(f"M = {t} rows (GEMMs {rs[ctas[0]]['gemm_ms']:.2f} ms)", fontsize=8)
    axes[0][0].set_ylabel("% of the four GEMMs' time")
    axes[0][0].legend(fontsize=7)
    r0 = rows[0]
    fig.suptitle(f"{r0['model']}{', shards as TP=' + str(r0['shard_as_tp']) if r0.get('shard_as_tp') else ''}: "
                 f"one layer's GEMMs beside the fused AR+norm, {r0['world_size']}x {r0['gpu']}  ({path.name})",
                 fontsize=8)
    fig.tight_layout()
    return _save(fig, name, out_dir)


def fig_overhead(path: Path, out_dir: Path):
    """Paper Fig. 1 / 3 analogue: share of the forward pass spent in all-reduce and in add + RMSNorm."""
    plt = _plt()
    # The ablation script's newer files also hold per-kind rows: the shares are in its summary rows.
    rows = sorted((r for r in load(path) if r.get("kind", "summary") == "summary"), key=lambda r: r["tokens"])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = range(len(rows))
    for i, (key, label) in enumerate((("comm_share", "all-reduce (ablation: 1 - nocomm/nccl)"),
                                      ("allreduce_share", "all-reduce alone"), ("norm_share", "add + RMSNorm alone"))):
        ax.bar([j + i * 0.27 for j in x], [100 * r[key] for r in rows], 0.27, label=label)
    v, _ = PAPER["comm_overhead_max"]
    ax.axhline(100 * v, color="r", ls="--", lw=0.8, label="paper: up to 20% (8xH100)")
    ax.set_xticks([j + 0.27 for j in x], [str(r["tokens"]) for r in rows])
    ax.set_xlabel("tokens")
    ax.set_ylabel("% of the nccl forward pass")
    ax.set_title(f"{rows[0]['model']}, TP={rows[0]['tp']}, {rows[0]['world_size']}x {rows[0]['gpu']}\n{path.name}",
                 fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, "overhead", out_dir)


def fig_split_mlp(path: Path, out_dir: Path):
    """Paper Fig. 9 analogue: an MLP block split in two, relative to unsplit."""
    plt = _plt()
    rows = load(path)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for kind in ("equal", "wave"):
        pts = sorted((r["tokens"], r["vs_unsplit"]) for r in rows if r["kind"] == kind)
        ax.plot(*zip(*pts), marker="o", ms=3, label=f"{kind} halves")
    ax.axhline(1.0, color="k", lw=0.8, label="unsplit")
    ax.set_xlabel("tokens")
    ax.set_ylabel("time / unsplit time")
    ax.set_title(f"MLP block split in two, {rows[0]['model']}, {rows[0]['gpu']}\n{path.name}", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, "split_mlp", out_dir)


KERNEL_HISTORY = [  # the same benchmark after each change to cuda/ar_norm_p2p.cu (experiments/NOTES.md)
    ("block per 2 rows, TP at run time", "kernels-H200x2-run14.jsonl"),
    ("+ batched loads", "kernels-H200x2-quick-batched-loads.jsonl"),
    ("+ TP compiled in", "kernels-H200x2-tw-tp-compiled.jsonl"),
    ("warp per row, no block barriers", "kernels-H200x2-warp-per-row.jsonl"),
]


def fig_kernel_history(paths: list[Path], out_dir: Path):
    """Fused P2P kernel at 8 CTAs (hidden 8192) after each change (one kernels-*.jsonl per version, in
    order; labelled from KERNEL_HISTORY), as a multiple of NCCL all-reduce's time in the same run."""
    plt = _plt()
    labels = {name: label for label, name in KERNEL_HISTORY}
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for f in map(Path, paths):
        label, name = labels.get(f.name, f.stem), f.name
        rows = [r for r in load(f) if r.get("hidden") == 8192]
        nccl = {r["tokens"]: r["time_us"] for r in rows if r["kernel"] == "nccl_ar"}
        pts = sorted((r["tokens"], r["time_us"] / nccl[r["tokens"]]) for r in rows
                     if r["kernel"] == "p2p_fused" and r["ctas"] == 8 and r["tokens"] in nccl)
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=f"{label} ({name})")
    ax.axhline(1.0, color="k", lw=0.8, label="NCCL all-reduce alone")
    ax.axhline(0.85, color="r", ls="--", lw=0.8, label="target: 0.85x with <= 8 CTAs")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens (hidden 8192, bf16)")
    ax.set_ylabel("fused AR+norm time / NCCL AR time")
    ax.set_title("P2P fused kernel at 8 CTAs, 2x H200, by version", fontsize=9)
    ax.legend(fontsize=6)
    return _save(fig, "kernel_history", out_dir)


def fig_timeline(paths: list[Path], out_dir: Path):
    """One layer of a traced forward pass (rank 0): compute and comm lanes, one panel per trace CSV."""
    plt = _plt()
    traces = [Path(p) for p in paths]
    colors = {"attn": "tab:blue", "mlp": "tab:green", "comm": "tab:orange"}  # by the trace's block column
    lanes = {"compute": 1, "comm": 0}
    fig, axes = plt.subplots(len(traces), 1, figsize=(10, 1.3 * len(traces) + 0.6), squeeze=False)
    for ax, f in zip(axes[:, 0], traces):
        rows = [r for r in load_trace(f) if r["rank"] == 0 and r["layer"] == 1]
        t0 = min(r["start_us"] for r in rows)
        for r in rows:
            ax.broken_barh([((r["start_us"] - t0) / 1e3, r["dur_us"] / 1e3)], (lanes[r["lane"]] - 0.4, 0.8),
                           color=colors.get(r["block"], "tab:gray"), edgecolor="k", lw=0.3)
        ax.set_yticks([0, 1], ["comm", "compute"])
        ax.set_title(f.stem, fontsize=8)
    axes[-1, 0].set_xlabel("ms from layer 1's first op (rank 0; eager pass with per-op events)")
    fig.suptitle("layer 1 timelines: blue attention, green MLP, orange communication (+ norm when fused), gray standalone norm "
                 f"({traces[0].parent.name})", fontsize=9)
    fig.tight_layout()
    return _save(fig, "timeline", out_dir)


FIGURE_FILES = {  # figure -> the committed result file(s) under experiments/results/ it draws, and only those
    "latency_speedup": ("latency-llama3-70b-tp2-H200-e2e-tuned.jsonl",),
    "latency_speedup_qwen": ("latency-qwen2.5-72b-tp2-H200-e2e-warp-per-row.jsonl",),
    "latency_speedup_shard8": ("latency-llama3-70b-shard-as-tp8-on-tp2-H200-tuned.jsonl",),
    "interference": ("interference-llama3-70b-tp2-H200.jsonl",),
    "interference_shard8": ("interference-llama3-70b-shard-as-tp8-on-tp2-H200.jsonl",),
    "kernels": ("kernels-H200x2-warp-per-row.jsonl",),
    "kernel_history": tuple(name for _, name in KERNEL_HISTORY),
    "attention": ("attention-H200-20261121-230856.jsonl",),
    "split": ("tune-llama3-70b-tp2-H200-warm-profile.jsonl",),
    "overhead": ("overhead-llama3-70b-tp2-H200.jsonl",),
    "split_mlp": ("split-tp2-H200.jsonl",),
    "timeline": tuple(f"traces-H200x2/trace-llama3-70b-tp2-{s}-4096.csv"
                      for s in ("finegrained4", "nccl", "tokenweave")),
    "moe": tuple(f"moe-block-mixtral-8x22b-{t}-H200.jsonl" for t in ("tp1", "tp2-shards", "tp8-shards",
                                                                       "tp8-shards-gather-timed")),
    "sm_share": ("sm_share-norm-llama-qwen-tp2-tp8-shards-H200.jsonl", "sm_share-pairs-llama-qwen-tp2-tp8-shards-H200.jsonl"),
    "decomposition": DECOMPOSITION_FILES,
}


def _one(fn, **kw):
    return lambda paths, out_dir: fn(paths[0], out_dir, **kw)


DRAW = {  # figure -> fn(paths of its FIGURE_FILES, out_dir) -> the files written
    "latency_speedup": _one(fig_latency),
    "latency_speedup_qwen": _one(fig_latency, name="latency_speedup_qwen"),
    "latency_speedup_shard8": _one(fig_latency, name="latency_speedup_shard8"),
    "interference": _one(fig_interference),
    "interference_shard8": _one(fig_interference, name="interference_shard8"),
    "kernels": _one(fig_kernels),
    "kernel_history": fig_kernel_history,
    "attention": _one(fig_attention),
    "split": _one(fig_split),
    "overhead": _one(fig_overhead),
    "split_mlp": _one(fig_split_mlp),
    "timeline": fig_timeline,
    "moe": fig_moe,
    "sm_share": fig_sm_share,
    "decomposition": fig_decomposition,
}


def result_paths(name: str) -> list[Path]:
    return [RESULTS_DIR / f for f in FIGURE_FILES[name]]


def draw(name: str, out_dir) -> list[Path]:
    """Draw one figure from its named files; raises (naming the file) if one is missing/empty/CPU-only."""
    return DRAW[name]([_check_file(p) for p in result_paths(name)], Path(out_dir))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", "--out", dest="out_dir", default=str(FIG_DIR),
                   help="directory for the PNG and PDF files (default experiments/figures/)")
    p.add_argument("--only", nargs="+", choices=list(FIGURE_FILES), metavar="FIGURE",
                   help=f"draw only these ({', '.join(FIGURE_FILES)})")
    args = p.parse_args(argv)
    failed = []
    for name in args.only or FIGURE_FILES:
        try:
            for out in draw(name, args.out_dir):
                print(f"wrote {out}  (from {', '.join(FIGURE_FILES[name])})")
        except Exception as e:  # report every figure that did not draw, then fail
            _plt().close("all")
            failed.append(name)
            print(f"FAILED {name}: {type(e).__name__}: {e}", file=sys.stderr)
    if failed:
        print(f"figures not drawn: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
