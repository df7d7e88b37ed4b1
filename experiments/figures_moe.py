"""The MoE block's figure (experiments/moe.py's rows), registered in experiments/figures.py as `moe`:
left, the routing share of the block (router + permutation + un-permute + host wait) per token count,
one line per expert shard (TP=1, 2, 8; a shard measured at two commits gets a line each, named by
commit), with the < 10% target; right, the expert GEMMs' TFLOP/s per
mode (loop, grouped) beside dense GEMMs of the same per-expert M."""
from __future__ import annotations

from pathlib import Path


def fig_moe(paths: list[Path], out_dir: Path):
    from experiments.figures import _plt, _save, load
    plt = _plt()
    files = [(p, sorted(load(p), key=lambda r: r["tokens"])) for p in paths]
    fig, (share, rate) = plt.subplots(1, 2, figsize=(10, 3.8))
    loops = [[r for r in rows if r["mode"] == "loop"] for _, rows in files]
    shards = [loop[0]["shard_tp"] for loop in loops]
    for loop, shard in zip(loops, shards):
        again = f" (commit {loop[0]['commit'][:7]})" if shards.count(shard) > 1 else ""  # one shard, two versions
        share.plot([r["tokens"] for r in loop], [100 * r["routing_share"] for r in loop], marker="o",
                   label=f"TP={shard} expert shards{again}")
    share.axhline(10, color="r", ls="--", lw=0.8, label="target < 10% (TP=1 shapes)")
    share.set_xscale("log", base=2)
    share.set_xlabel("tokens")
    share.set_ylabel("% of the MoE block")
    share.set_title("routing: router + permute + un-permute + host wait", fontsize=9)
    share.legend(fontsize=7)
    path, rows = files[0]
    for mode in sorted({r["mode"] for r in rows}):
        sel = [r for r in rows if r["mode"] == mode]
        rate.plot([r["tokens"] for r in sel], [r["tflops"] for r in sel], marker="o", label=f"experts: {mode}")
    dense = [r for r in rows if r["mode"] == "loop"]
    rate.plot([r["tokens"] for r in dense], [r["dense_tflops"] for r in dense], "k--", label="dense, same M per expert")
    rate.set_xscale("log", base=2)
    rate.set_ylim(bottom=0)
    rate.set_xlabel("tokens")
    rate.set_ylabel("TFLOP/s")
    rate.set_title(f"expert GEMMs, TP={rows[0]['shard_tp']} shapes ({path.name})", fontsize=9)
    rate.legend(fontsize=7)
    ticks = sorted({r["tokens"] for _, rs in files for r in rs})
    for ax in (share, rate):
        ax.set_xticks(ticks, [f"{t // 1024}K" for t in ticks])
        ax.minorticks_off()
    fig.suptitle(f"{rows[0]['model']} MoE block, one {rows[0]['gpu']}", fontsize=10)
    return _save(fig, "moe", out_dir)
