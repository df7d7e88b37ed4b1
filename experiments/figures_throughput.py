"""Throughput figures from experiments/throughput.py result files, GPU rows only.

    python -m experiments.figures_throughput FILE [FILE ...]          # -> experiments/figures/
    python -m experiments.figures_throughput FILE --out-dir /tmp/f --chunk 2048

- throughput_vs_nccl (the paper's Fig. 12): total tokens/s relative to nccl, one bar per strategy,
  grouped by workload, at one chunk size (--chunk; default the largest in the files);
- throughput_chunk (Fig. 13): the same ratio over the chunk sizes in the files, one line per strategy,
  one panel per workload (drawn when the files hold at least two chunk sizes; else skipped, said so).
The ratio is taken within one file and one (chunk, workload), the nccl baseline from the same run.
Like experiments/figures.py it reads only the files it is given, drops CPU-fallback rows (their
timings mean nothing) and fails, naming the file, when a file is missing, empty or CPU-only. There is
no committed GPU throughput file yet, so nothing names one by default.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.figures import FIG_DIR, _plt, _save, load


def relative(rows: list[dict]) -> dict:
    """{(chunk, workload): {strategy: tokens/s / nccl's}}; groups without an nccl row are left out."""
    groups = {}
    for r in rows:
        groups.setdefault((r["chunk"], r["workload"]), {})[r["strategy"]] = r["total_tokens_per_s"]
    return {k: {s: v / g["nccl"] for s, v in g.items()} for k, g in groups.items() if g.get("nccl")}


def _title(rows, paths) -> str:
    r0 = rows[0]
    return (f"{r0['model']}, {r0['layers']} layers, TP={r0['tp']} on {r0['world_size']}x {r0['gpu']}, "
            f"{r0['requests']} requests\n{', '.join(Path(p).name for p in paths)}")


def fig_throughput(paths, out_dir: Path, chunk: int | None = None, name: str = "throughput_vs_nccl"):
    plt = _plt()
    rows = [r for p in paths for r in load(p)]
    rel = relative(rows)
    if not rel:
        raise ValueError(f"no (chunk, workload) with an nccl row in {[str(p) for p in paths]}")
    chunk = chunk or max(c for c, _ in rel)
    loads = [w for c, w in rel if c == chunk]
    if not loads:
        raise ValueError(f"no rows at chunk {chunk}; the files hold chunks {sorted({c for c, _ in rel})}")
    strategies = [s for s in dict.fromkeys(r["strategy"] for r in rows) if s != "nccl"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / max(1, len(strategies))
    for i, s in enumerate(strategies):
        ax.bar([j + i * width for j in range(len(loads))], [rel[chunk, w].get(s, 0) for w in loads], width, label=s)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(loads))], loads, fontsize=8)
    ax.set_ylabel("tokens/s vs nccl")
    ax.set_title(f"{_title(rows, paths)}  (chunk {chunk})", fontsize=9)
    ax.set_ylim(0.8, max(1.2, ax.get_ylim()[1]))
    ax.legend(fontsize=7, ncol=3)
    return _save(fig, name, out_dir)


def fig_chunk(paths, out_dir: Path, name: str = "throughput_chunk"):
    plt = _plt()
    rows = [r for p in paths for r in load(p)]
    rel = relative(rows)
    chunks = sorted({c for c, _ in rel})
    if len(chunks) < 2:
        return []   # nothing to draw over: main() says so
    loads = list(dict.fromkeys(w for _, w in sorted(rel)))
    strategies = [s for s in dict.fromkeys(r["strategy"] for r in rows) if s != "nccl"]
    fig, axes = plt.subplots(1, len(loads), figsize=(3.6 * len(loads), 3.4), squeeze=False)
    for ax, w in zip(axes[0], loads):
        xs = [c for c in chunks if (c, w) in rel]
        for s in strategies:
            pts = [(c, rel[c, w][s]) for c in xs if s in rel[c, w]]
            ax.plot([c for c, _ in pts], [v for _, v in pts], marker="o", label=s)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(c) for c in xs])
        ax.set_xlabel("chunk (tokens per step)")
        ax.set_title(w, fontsize=9)
    axes[0][0].set_ylabel("tokens/s vs nccl")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(_title(rows, paths), fontsize=9)
    return _save(fig, name, out_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.figures_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="throughput result files (JSON lines) from GPU runs")
    p.add_argument("--out-dir", default=str(FIG_DIR), help="directory for the PNG and PDF files (default: %(default)s)")
    p.add_argument("--chunk", type=int, default=None, help="chunk size of the bar figure (default: the largest)")
    args = p.parse_args(argv)
    if not args.files:
        print("no throughput result files given (none from a GPU is committed yet); run "
              "experiments.throughput on a GPU and pass its file", file=sys.stderr)
        return 1
    out, failed = Path(args.out_dir), []
    for name, draw in (("throughput_vs_nccl", lambda: fig_throughput(args.files, out, args.chunk)),
                       ("throughput_chunk", lambda: fig_chunk(args.files, out))):
        try:
            written = draw()
            for path in written:
                print(f"wrote {path}")
            if not written:
                print(f"{name}: not drawn (fewer than two chunk sizes in the files)")
        except Exception as e:  # report every figure that did not draw, then fail
            _plt().close("all")
            failed.append(name)
            print(f"FAILED {name}: {type(e).__name__}: {e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
