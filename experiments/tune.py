"""Tune TokenWeave per token count: CTA budgets of the fused kernel, and the split point, checked
against an exhaustive end-to-end search.

    mpirun -n 2 python -m experiments.tune --model llama3-70b --layers 4 --tokens 4096 8192

For each token count T:
1. the wave-aware split s_wave from the GEMM profile (tw/split.py; the profile JSON is written to
   experiments/tuned/ and reused);
2. CTA budgets (comm overlapping attention, comm overlapping MLP) from --ctas-grid, timed end to end
   at s_wave; the fastest pair wins;
3. the exhaustive search: tokenweave timed at every split point on a --step grid within --window of T/2,
   with the winning CTAs; reports best_split, its time, and wave_vs_best = t(s_wave) / t(best);
4. the shortlist: the rule's --shortlist best-predicted points, timed end to end in the same rounds;
   shortlist_vs_best = t(fastest of them) / t(best). With --no-exhaustive only the shortlist (and
   T/2) is timed and its fastest point becomes best_split: a tune in a few points instead of ~13;
5. not splitting at all (the fused kernel on every SM, nothing overlapped), in the same rounds:
   split = best_split beats it. latency.py runs tokenweave unsplit where split is false (on 2xH200 the
   split lost to the unsplit fused path at 1K-2K tokens: experiments/NOTES.md).
Configurations are timed round-robin, --repeats rounds, median round: on the lab machine the same
configuration timed twice in sequence differed by up to 5%, more than the effects being compared.
Rank 0's timings decide (the timings are already the slowest rank's); the choice is broadcast through
the timing itself, which `tw.bench.summarize` makes identical on every rank. Writes result rows and
experiments/tuned/tokenweave-<model>-tp<tp>-<gpu>.json, which experiments/latency.py reads: the CTA
budgets, and (its default --split tuned) best_split as tokenweave's split point; split_at there is
the wave rule's choice, kept to report how far the rule is from the search.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from tw import batch as batching
from tw import bench, config, dist, graph, results, schedules
from tw import split as splitting
from tw.model import Model


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="mpirun -n <TP> python -m experiments.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3-70b", help=f"model preset, from {sorted(config.PRESETS)}")
    p.add_argument("--layers", type=int, default=4, help="decoder layers per forward pass")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192], help="token counts to tune")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per prefill sequence")
    p.add_argument("--shard-as-tp", type=int, default=None,
                   help="tune the emulated setting of experiments.latency --shard-as-tp N (its own tuned file)")
    p.add_argument("--transport", choices=("p2p", "nccl"), default="p2p", help="fused-kernel transport")
    p.add_argument("--ctas-grid", type=int, nargs="+", default=[2, 4, 8, 16],
                   help="CTA counts tried for each of the two budgets (all pairs)")
    p.add_argument("--step", type=int, default=64, help="grid of the exhaustive split search (tokens)")
    p.add_argument("--window", type=float, default=0.10, help="exhaustive search spans T/2 +- window*T")
    p.add_argument("--iters", type=int, default=10, help="timed forward passes per point")
    p.add_argument("--warmup", type=int, default=3, help="untimed forward passes per point")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds over all configurations (each timed once per round); the median round counts")
    p.add_argument("--shortlist", type=int, default=3,
                   help="also time the wave rule's N best-predicted split points end to end (N >= 1)")
    p.add_argument("--no-exhaustive", action="store_true",
                   help="skip the exhaustive split search: best_split is then the shortlist's fastest point")
    p.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto", help="auto: GPU if usable")
    p.add_argument("--out", default=None, help="result rows (JSON lines)")
    return p.parse_args(argv)


UNSPLIT = 0  # the split "point" that stands for not splitting (tokenweave = the fused kernel, every SM)


def save_choice(tag: str, gpu: str, cfg, tp: int, tokens: int, entry: dict):
    """Merge one token count's choice into experiments/tuned/tokenweave-<tag>.json (what latency reads)."""
    path = splitting.TUNED_DIR / f"tokenweave-{tag}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update({"gpu": gpu, "model": cfg.name, "tp": tp, "layers": cfg.num_layers})
    data.setdefault("tokens", {})[str(tokens)] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


def main(argv=None):
    args = parse_args(argv)
    if args.shortlist < 1:
        raise SystemExit(f"--shortlist must be >= 1 (the wave rule's own pick is always timed), got {args.shortlist}")
    world = dist.init(None, args.device)
    cfg = config.get(args.model, args.layers)
    stream = world.new_stream()
    if not world.is_gpu:
        world.print0("NO GPU: CPU fallback (checks the procedure; timings mean nothing, no GEMM profile)")
    model = Model(cfg, world, max(args.tokens), seed=0, shard_as_tp=args.shard_as_tp)
    tw = schedules.make("tokenweave", model, world, args.transport, min_split_tokens=1)
    profile = getattr(tw.split_fn, "profile", None)  # None on CPU: the wave rule falls back to T/2
    gpu = results.gpu_info()["gpu"].replace(" ", "_")
    tag = splitting.tuned_tag(cfg.name, world.tp_size, gpu, args.shard_as_tp)
    writer = results.Writer(args.out or results.default_path("tune", tag),
                            results.metadata(world, model=cfg.name, layers=cfg.num_layers, transport=args.transport,
                                             shard_as_tp=args.shard_as_tp,
                                             iters=args.iters, warmup=args.warmup), world.rank)

    def graph_of(batch, ids, split_at, ctas_attn, ctas_mlp):
        tw.ctas_attn, tw.ctas_mlp = ctas_attn, ctas_mlp
        plan = tw.prepare(batch, ids, split_at, unsplit=split_at == UNSPLIT)  # unsplit ignores split_at
        run = lambda: tw.forward(plan, stream)  # noqa: E731
        return graph.Graph(run, stream) if world.is_gpu else run

    def timed_all(batch, ids, configs):
        """Median over --repeats rounds, each round timing every config once in turn, so slow drifts
        (clocks, temperature) hit every config alike instead of favouring the ones measured first."""
        graphs = {c: graph_of(batch, ids, *c) for c in configs}
        times = {c: [] for c in configs}
        for _ in range(args.repeats):
            for c, g in graphs.items():
                t = (bench.time_gpu(g, args.iters, args.warmup, stream) if world.is_gpu
                     else bench.time_cpu(g, 1, 0))
                times[c].append(bench.summarize(t, world.comm)["median_ms"])
        return {c: float(np.median(t)) for c, t in times.items()}

    for tokens in args.tokens:
        t0 = time.perf_counter()
        batch = batching.prefill(tokens, args.seq_len)
        ids = batching.token_ids(tokens, cfg.vocab, 0)
        shortlist = (splitting.wave_shortlist(tokens, profile, args.shortlist) if profile
                     else [splitting.naive(tokens)]) if world.tp_rank == 0 else None
        shortlist = world.tp_comm.bcast(shortlist, root=0)
        wave = shortlist[0]
        ctas_times = timed_all(batch, ids, [(wave, ca, cm) for ca in args.ctas_grid for cm in args.ctas_grid])
        for (_, ca, cm), ms in ctas_times.items():
            writer.write({"tokens": tokens, "kind": "ctas", "split_at": wave, "ctas_attn": ca, "ctas_mlp": cm,
                          "median_ms": ms})
        (_, ca, cm), _ = min(ctas_times.items(), key=lambda kv: kv[1])
        # Every split point (the shortlist and naive included) measured in the same round-robin.
        points = sorted({splitting.naive(tokens), *shortlist} | (set() if args.no_exhaustive else
                                                               set(splitting.candidates(tokens, args.step, args.window))))
        split_times = {c[0]: ms for c, ms in timed_all(batch, ids, [(s, ca, cm) for s in points + [UNSPLIT]]).items()}
        unsplit_ms = split_times.pop(UNSPLIT)
        writer.write({"tokens": tokens, "kind": "unsplit", "split_at": None, "median_ms": unsplit_ms})
        for s, ms in split_times.items():
            writer.write({"tokens": tokens, "kind": "split", "split_at": s, "ctas_attn": ca, "ctas_mlp": cm,
                          "median_ms": ms, "wave_split": s == wave, "shortlisted": s in shortlist})
        wave_ms = split_times[wave]
        short = min(shortlist, key=split_times.get)
        best_s = min(split_times, key=split_times.get)
        entry = {"split_at": wave, "ctas_attn": ca, "ctas_mlp": cm, "median_ms": wave_ms,
                 "naive_split_ms": split_times[splitting.naive(tokens)], "shortlist": shortlist,
                 "shortlist_best": short, "shortlist_ms": split_times[short],
                 "search": "shortlist" if args.no_exhaustive else "exhaustive",
                 "best_split": best_s, "best_split_ms": split_times[best_s],
                 "unsplit_ms": unsplit_ms, "split": split_times[best_s] < unsplit_ms}
        if not args.no_exhaustive:
            entry.update(wave_vs_best=wave_ms / split_times[best_s],
                         shortlist_vs_best=split_times[short] / split_times[best_s])
        writer.write({"tokens": tokens, "kind": "choice", **entry})
        if world.rank == 0 and profile is not None:  # after every token count: a killed run keeps its work
            profile.save()
            path = save_choice(tag, gpu, cfg, world.tp_size, tokens, entry)
            world.print0(f"  saved to {path}")
        world.print0(f"tokens={tokens}: ctas {ca}/{cm}; split {wave} (wave rule) {wave_ms:.3f} ms; naive "
                     f"{entry['naive_split_ms']:.3f} ms; best of the rule's top {len(shortlist)} {short} "
                     f"{entry['shortlist_ms']:.3f} ms" + (f"; exhaustive best {best_s} {entry['best_split_ms']:.3f} ms, "
                     f"wave/best {entry['wave_vs_best']:.4f}, shortlist/best {entry['shortlist_vs_best']:.4f}"
                     if not args.no_exhaustive else "") + f"; unsplit (fused, every SM) {unsplit_ms:.3f} ms"
                     + ("" if entry["split"] else " -> do not split") + f"  ({time.perf_counter() - t0:.0f} s)")
    world.print0(f"wrote {writer.path}" + ("" if profile else " (CPU: nothing saved to experiments/tuned/)"))
    return 0


if __name__ == "__main__":
    dist.shutdown(main())
