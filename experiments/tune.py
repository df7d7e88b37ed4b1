"""Tune TokenWeave per token count: CTA budgets of the fused kernel, and the split point, checked
against an exhaustive end-to-end search.

    mpirun -n 2 python -m experiments.tune --model llama3-70b --layers 4 --tokens 4096 8192

For each token count T:
1. the wave-aware split s_wave from the GEMM profile (tw/schedule/split.py, tw/schedule/profile.py; the profile JSON is
   written to experiments/tuned/ and reused);
2. CTA budgets (comm overlapping attention, comm overlapping MLP) from --ctas-grid, timed end to end
   at s_wave; the fastest pair wins; then the cuBLAS SM-count target of the GEMMs beside each of the
   two comm budgets, every pair of --sm-targets candidates (off: none; left: the SMs the comm leaves;
   half: halfway between; GPU only), timed the same way; the fastest pair wins;
3. the exhaustive search: tokenweave timed at every split point on a --step grid within --window of
   T/2, with the winning CTAs; best_split, its time, and wave_vs_best = t(s_wave) / t(best);
4. the shortlist: the rule's --shortlist best-predicted points, timed in the same rounds, and the
   pick of the rule on a loaded profile (GEMMs timed beside the chosen CTA budgets' SMs held, with
   the chosen SM targets: tw/schedule/profile.py), loaded_split / loaded_vs_best (GPU only);
   shortlist_vs_best = t(fastest of them) / t(best). With --no-exhaustive only the shortlist (and
   T/2) is timed and its fastest point becomes best_split: a tune in a few points instead of ~13;
5. not splitting at all (the fused kernel on every SM, nothing overlapped), in the same rounds.
Configurations are timed with the timer every experiment uses (tw/measure/bench.py: rounds in a rotated
order, median of all samples, slowest rank), so tune's times and latency's are comparable. The
choice (tw/schedule/tuned.py) is keyed by everything that changes it: model, TP, --shard-as-tp, --layers,
--transport, --seq-len and the GPU; experiments.latency --split tuned reads exactly that key.
Rows: kind (ctas / split / unsplit / choice), tokens, split_at, ctas_attn, ctas_mlp, median_ms, and
in the choice row the TunedChoice fields.
"""
from __future__ import annotations

import time

from experiments import common
from tw.model import batch as batching
from tw.measure import bench
from tw.runtime import dist, graph
from tw.schedule import tuned
from tw.schedule import strategies as schedules
from tw.schedule import split as splitting

UNSPLIT = "unsplit"  # the configuration that stands for not splitting


def parse_args(argv=None):
    p = common.parser("tune", __doc__)
    common.add_model_flags(p)
    common.add_tokens_flag(p, gpu=[4096, 8192], cpu=[256], help="token counts to tune")
    p.add_argument("--seq-len", default=1024, metavar="N|all",
                   help="tokens per prefill sequence; all: each batch is one prompt of T tokens (what "
                        "experiments.latency --seq-len all / --paper runs), tuned under the key seq_len = T")
    common.add_transport_flag(p)
    p.add_argument("--ctas-grid", type=int, nargs="+", default=[8, 16, 32],
                   help="CTA counts tried for each of the two budgets (all pairs)")
    p.add_argument("--sm-targets", nargs="+", choices=("off", "left", "half"), default=["off", "left", "half"],
                   help="SM-count target candidates for the GEMMs beside a comm of k CTAs: off (none), left "
                        "(SMs - k), half (SMs - k/2); each pair (attention, MLP) is timed")
    p.add_argument("--step", type=int, default=64, help="grid of the exhaustive split search (tokens)")
    p.add_argument("--window", type=float, default=0.10, help="exhaustive search spans T/2 +- window*T")
    common.add_timing_flags(p, iters=10, warmup=3, repeats=3)
    p.add_argument("--shortlist", type=int, default=3,
                   help="also time the wave rule's N best-predicted split points end to end (N >= 1)")
    p.add_argument("--no-exhaustive", action="store_true",
                   help="skip the exhaustive split search: best_split is then the shortlist's fastest point")
    common.add_run_flags(p, tp=False)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.shortlist < 1:
        raise dist.UsageError(f"--shortlist must be >= 1 (the wave rule's own pick is always timed), got {args.shortlist}")
    if not 0 < args.window < 0.5 or args.step < 1:
        raise dist.UsageError(f"--window must lie in (0, 0.5) and --step be >= 1, got {args.window} and {args.step}")
    args.seq_len = common.seq_len_value(args.seq_len)
    world = common.init(args)
    cfg = common.model_config(args, world)
    stream = world.new_stream()
    if not world.is_gpu:
        world.print0("(CPU: checks the procedure only; no GEMM profile, nothing saved to experiments/tuned/)")
    model = common.build_model(args, world, cfg, max(args.tokens))
    tw = schedules.make("tokenweave", model, world, args.transport, min_split_tokens=1)
    profile = tw.split_fn.profile  # None on the CPU: the wave rule is then T/2
    def key_of(tokens):  # one key per sequence length: with --seq-len all, one per token count
        return common.tuning_key(args, world, cfg, common.seq_len_of(args, tokens))

    writer = common.writer(args, world, "tune", cfg,
                           tuning_key=key_of(args.tokens[0]).tag if args.seq_len != "all" else "per token count")

    def runnable(batch, ids, config):
        split_at, ca, cm, ta, tm = config
        choice = (tuned.TunedChoice(None, ca, cm, split=False) if split_at == UNSPLIT else
                  tuned.TunedChoice(split_at, ca, cm, sm_target_attn=ta, sm_target_mlp=tm, extra={"source": "forced"}))
        plan = tw.prepare(batch, ids, choice)
        run = lambda: tw.forward(plan, stream)  # noqa: E731
        # an MoE block waits on the host for its row counts: no CUDA graph (tw/model/moe.py)
        return graph.Graph(run, stream) if world.is_gpu and not model.cfg.num_experts else run

    def timed_all(batch, ids, configs):
        runs = {c: runnable(batch, ids, c) for c in configs}
        with dist.step(f"tune: timing {len(configs)} configurations"):
            samples = bench.round_robin(configs, lambda c: bench.passes(runs[c], world, stream, args.iters,
                                                                        args.warmup), args.repeats)
        return {c: bench.slowest_median(s, world.comm) for c, s in samples.items()}

    def sm_targets(k):
        """The candidate SM-count targets for GEMMs beside a comm kernel of k CTAs (None: no target)."""
        sms = world.sm_count
        values = {"off": None, "left": sms - k, "half": sms - k // 2}
        return {values[c] for c in args.sm_targets}

    for tokens in args.tokens:
        t0 = time.perf_counter()
        batch = batching.prefill(tokens, common.seq_len_of(args, tokens))
        ids = batching.token_ids(tokens, cfg.vocab, 0)
        shortlist = (splitting.wave_shortlist(tokens, profile, args.shortlist) if profile
                     else [splitting.naive(tokens)]) if world.tp_rank == 0 else None
        shortlist = world.tp_comm.bcast(shortlist, root=0)
        wave = shortlist[0]
        ctas_times = timed_all(batch, ids, [(wave, ca, cm, None, None) for ca in args.ctas_grid
                                            for cm in args.ctas_grid])
        for (_, ca, cm, _, _), ms in ctas_times.items():
            writer.write({"tokens": tokens, "kind": "ctas", "split_at": wave, "ctas_attn": ca, "ctas_mlp": cm,
                          "median_ms": ms})
        (_, ca, cm, _, _), _ = min(ctas_times.items(), key=lambda kv: kv[1])
        ta = tm = None
        if world.is_gpu:
            pairs = sorted({(a, b) for a in sm_targets(ca) for b in sm_targets(cm)}, key=str)
            target_times = timed_all(batch, ids, [(wave, ca, cm, a, b) for a, b in pairs])
            for (_, _, _, a, b), ms in target_times.items():
                writer.write({"tokens": tokens, "kind": "sm_target", "split_at": wave, "ctas_attn": ca,
                              "ctas_mlp": cm, "sm_target_attn": a, "sm_target_mlp": b, "median_ms": ms})
            (_, _, _, ta, tm), _ = min(target_times.items(), key=lambda kv: kv[1])
        loaded = None
        if world.is_gpu:  # the rule on GEMMs timed as they run in the schedule: beside the comm's SMs
            from tw.schedule.profile import GemmProfile
            lp = GemmProfile(model, held=(ca, cm), targets=(ta, tm))
            loaded = splitting.wave_split(tokens, lp) if world.tp_rank == 0 else None
            loaded = world.tp_comm.bcast(loaded, root=0)
            if world.rank == 0:
                lp.save()
        # Every split point (the shortlist, naive, the loaded pick) and not splitting, in the same rounds.
        points = sorted({splitting.naive(tokens), *shortlist, *([loaded] if loaded else [])} | (set() if args.no_exhaustive else
                                                               set(splitting.candidates(tokens, args.step, args.window))))
        times = timed_all(batch, ids, [(s, ca, cm, ta, tm) for s in points] + [(UNSPLIT, ca, cm, None, None)])
        split_times = {c[0]: ms for c, ms in times.items() if c[0] != UNSPLIT}
        unsplit_ms = times[(UNSPLIT, ca, cm, None, None)]
        writer.write({"tokens": tokens, "kind": "unsplit", "split_at": None, "ctas": world.sm_count or None,
                      "median_ms": unsplit_ms})
        for s, ms in split_times.items():
            writer.write({"tokens": tokens, "kind": "split", "split_at": s, "ctas_attn": ca, "ctas_mlp": cm,
                          "median_ms": ms, "wave_split": s == wave, "shortlisted": s in shortlist})
        short = min(shortlist, key=split_times.get)
        best = min(split_times, key=split_times.get)
        extra = {"naive_split_ms": split_times[splitting.naive(tokens)], "shortlist": shortlist,
                 "shortlist_best": short, "shortlist_ms": split_times[short]}
        if loaded:
            extra.update(loaded_split=loaded, loaded_ms=split_times[loaded],
                         loaded_vs_best=split_times[loaded] / split_times[min(split_times, key=split_times.get)])
        if not args.no_exhaustive:
            extra.update(wave_vs_best=split_times[wave] / split_times[best],
                         shortlist_vs_best=split_times[short] / split_times[best])
        choice = tuned.TunedChoice(split_at=best, ctas_attn=ca, ctas_mlp=cm, split=split_times[best] < unsplit_ms,
                                   sm_target_attn=ta, sm_target_mlp=tm,
                                   wave_split=wave, median_ms=split_times[best], wave_ms=split_times[wave],
                                   unsplit_ms=unsplit_ms, search="shortlist" if args.no_exhaustive else "exhaustive",
                                   extra=extra)
        writer.write({"tokens": tokens, "kind": "choice", "tuning_key": key_of(tokens).tag, **choice.to_json()})
        if world.rank == 0 and profile is not None:  # after every token count: a killed run keeps its work
            profile.save()
            world.print0(f"  saved to {tuned.save(key_of(tokens), tokens, choice)}")
        world.print0(f"tokens={tokens}: ctas {ca}/{cm}; SM targets {ta}/{tm}; split {wave} (wave rule) {split_times[wave]:.3f} ms; naive "
                     f"{extra['naive_split_ms']:.3f} ms; best of the rule's top {len(shortlist)} {short} "
                     f"{extra['shortlist_ms']:.3f} ms" + (f"; exhaustive best {best} {split_times[best]:.3f} ms, "
                     f"wave/best {extra['wave_vs_best']:.4f}, shortlist/best {extra['shortlist_vs_best']:.4f}"
                     if not args.no_exhaustive else "") + f"; unsplit (fused, every SM) {unsplit_ms:.3f} ms"
                     + ("" if choice.split else " -> do not split") + f"  ({time.perf_counter() - t0:.0f} s)")
    world.print0(f"wrote {writer.path}")
    return 0


if __name__ == "__main__":
    dist.shutdown(main())
