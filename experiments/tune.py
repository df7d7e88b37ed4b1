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
from dataclasses import dataclass

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


@dataclass
class Tuner:
    """A tune run as `build` sets it up; every later step reads it. tw: the tokenweave strategy, each
    configuration forced on it (a TunedChoice passed to prepare)."""
    args: object
    world: object
    cfg: object
    model: object
    tw: object
    stream: object
    writer: object

    def key_of(self, tokens: int):
        """The tuning key of a batch of `tokens` tokens: one per sequence length (with --seq-len all, one
        per token count)."""
        return common.tuning_key(self.args, self.world, self.cfg, common.seq_len_of(self.args, tokens))


def main(argv=None):
    args = parse_args(argv)
    validate(args)
    t = build(args)
    for tokens in args.tokens:
        tune_point(t, tokens)
    t.world.print0(f"wrote {t.writer.path}")
    return 0


def validate(args) -> None:
    """User errors, before anything is built (each names its flag)."""
    if args.shortlist < 1:
        raise dist.UsageError(f"--shortlist must be >= 1 (the wave rule's own pick is always timed), got {args.shortlist}")
    if not 0 < args.window < 0.5 or args.step < 1:
        raise dist.UsageError(f"--window must lie in (0, 0.5) and --step be >= 1, got {args.window} and {args.step}")
    args.seq_len = common.seq_len_value(args.seq_len)


def build(args) -> Tuner:
    """The world, the model, tokenweave (its split rule measures the GEMM profile on a GPU) and the writer."""
    world = common.init(args)
    cfg = common.model_config(args, world)
    stream = world.new_stream()
    if not world.is_gpu:
        world.print0("(CPU: checks the procedure only; no GEMM profile, nothing saved to experiments/tuned/)")
    model = common.build_model(args, world, cfg, max(args.tokens))
    tw = schedules.make("tokenweave", model, world, args.transport, min_split_tokens=1, p2p=common.p2p_options(args))
    key = (common.tuning_key(args, world, cfg, common.seq_len_of(args, args.tokens[0])).tag if args.seq_len != "all"
           else "per token count")
    writer = common.writer(args, world, "tune", cfg, tuning_key=key)
    return Tuner(args, world, cfg, model, tw, stream, writer)


def tune_point(t, tokens: int) -> None:
    """Steps 1-5 of the module docstring at one token count, then its choice (report)."""
    t0 = time.perf_counter()
    batch = batching.prefill(tokens, common.seq_len_of(t.args, tokens))
    ids = batching.token_ids(tokens, t.cfg.vocab, 0)
    rule = t.tw.policy.rule   # the wave rule (on the CPU: naive, T/2)
    shortlist = rule.shortlist(tokens, t.args.shortlist)
    wave = shortlist[0]
    ca, cm = tune_ctas(t, batch, ids, tokens, wave)
    ta, tm = tune_sm_targets(t, batch, ids, tokens, wave, ca, cm) if t.world.is_gpu else (None, None)
    loaded = loaded_split(t, tokens, ca, cm, ta, tm) if t.world.is_gpu else None
    # Every split point (the shortlist, naive, the loaded pick) and not splitting, in the same rounds.
    points = sorted({splitting.naive(tokens), *shortlist, *([loaded] if loaded else [])} | (set() if t.args.no_exhaustive else
                                                           set(splitting.candidates(tokens, t.args.step, t.args.window))))
    times = time_all(t, batch, ids, [(s, ca, cm, ta, tm) for s in points] + [(UNSPLIT, ca, cm, None, None)])
    split_times = {c[0]: ms for c, ms in times.items() if c[0] != UNSPLIT}
    unsplit_ms = times[(UNSPLIT, ca, cm, None, None)]
    t.writer.write({"tokens": tokens, "kind": "unsplit", "split_at": None, "ctas": t.world.sm_count or None,
                    "median_ms": unsplit_ms})
    for s, ms in split_times.items():
        t.writer.write({"tokens": tokens, "kind": "split", "split_at": s, "ctas_attn": ca, "ctas_mlp": cm,
                        "median_ms": ms, "wave_split": s == wave, "shortlisted": s in shortlist})
    report(t, tokens, (ca, cm, ta, tm), shortlist, loaded, split_times, unsplit_ms, t0)


def capture(t, batch, ids, config):
    """What one configuration (split_at or UNSPLIT, ctas_attn, ctas_mlp, sm_target_attn, sm_target_mlp)
    times: its plan forced on tokenweave, as a CUDA graph on a GPU."""
    split_at, ca, cm, ta, tm = config
    choice = (tuned.TunedChoice(None, ca, cm, split=False) if split_at == UNSPLIT else
              tuned.TunedChoice(split_at, ca, cm, sm_target_attn=ta, sm_target_mlp=tm, extra={"source": "forced"}))
    plan = t.tw.prepare(batch, ids, choice)
    run = lambda: t.tw.forward(plan, t.stream)  # noqa: E731
    # an MoE block waits on the host for its row counts: no CUDA graph (tw/model/moe.py)
    return graph.Graph(run, t.stream) if t.world.is_gpu and not t.model.cfg.num_experts else run


def time_all(t, batch, ids, configs) -> dict:
    """{configuration: ms}: every configuration timed in the same rounds (tw/measure/bench.py), slowest rank."""
    runs = {c: capture(t, batch, ids, c) for c in configs}
    with dist.step(f"tune: timing {len(configs)} configurations"):
        samples = bench.round_robin(configs, lambda c: bench.passes(runs[c], t.world, t.stream, t.args.iters,
                                                                    t.args.warmup), t.args.repeats)
    return {c: bench.slowest_median(s, t.world.comm) for c, s in samples.items()}


def tune_ctas(t, batch, ids, tokens, wave) -> tuple:
    """Step 2a: (ctas_attn, ctas_mlp), the fastest pair of --ctas-grid at the wave rule's split."""
    ctas_times = time_all(t, batch, ids, [(wave, ca, cm, None, None) for ca in t.args.ctas_grid
                                          for cm in t.args.ctas_grid])
    for (_, ca, cm, _, _), ms in ctas_times.items():
        t.writer.write({"tokens": tokens, "kind": "ctas", "split_at": wave, "ctas_attn": ca, "ctas_mlp": cm,
                        "median_ms": ms})
    (_, ca, cm, _, _), _ = min(ctas_times.items(), key=lambda kv: kv[1])
    return ca, cm


def tune_sm_targets(t, batch, ids, tokens, wave, ca, cm) -> tuple:
    """Step 2b (GPU): (sm_target_attn, sm_target_mlp), the fastest pair of --sm-targets candidates."""
    def candidates(k):
        """The SM-count targets for GEMMs beside a comm kernel of k CTAs (None: no target)."""
        sms = t.world.sm_count
        values = {"off": None, "left": sms - k, "half": sms - k // 2}
        return {values[c] for c in t.args.sm_targets}

    pairs = sorted({(a, b) for a in candidates(ca) for b in candidates(cm)}, key=str)
    target_times = time_all(t, batch, ids, [(wave, ca, cm, a, b) for a, b in pairs])
    for (_, _, _, a, b), ms in target_times.items():
        t.writer.write({"tokens": tokens, "kind": "sm_target", "split_at": wave, "ctas_attn": ca,
                        "ctas_mlp": cm, "sm_target_attn": a, "sm_target_mlp": b, "median_ms": ms})
    (_, _, _, ta, tm), _ = min(target_times.items(), key=lambda kv: kv[1])
    return ta, tm


def loaded_split(t, tokens, ca, cm, ta, tm) -> int:
    """Step 4's loaded pick (GPU): the wave rule on GEMMs timed as they run in the schedule, beside the
    comm's SMs with the chosen targets (tw/schedule/profile.py); that profile is saved."""
    from tw.schedule.profile import GemmProfile
    lp = GemmProfile(t.model, held=(ca, cm), targets=(ta, tm))
    loaded = splitting.wave_split(tokens, lp) if t.world.tp_rank == 0 else None
    loaded = t.world.tp_comm.bcast(loaded, root=0)
    if t.world.rank == 0:
        lp.save()
    return loaded


def report(t, tokens, budgets, shortlist, loaded, split_times, unsplit_ms, t0) -> None:
    """The choice at this token count: its row, the tuned file (GPU) and one line."""
    args, world = t.args, t.world
    ca, cm, ta, tm = budgets
    wave = shortlist[0]
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
    t.writer.write({"tokens": tokens, "kind": "choice", "tuning_key": t.key_of(tokens).tag, **choice.to_json()})
    profile = t.tw.policy.rule.profile
    if world.rank == 0 and profile is not None:  # after every token count: a killed run keeps its work
        profile.save()
        world.print0(f"  saved to {tuned.save(t.key_of(tokens), tokens, choice)}")
    world.print0(f"tokens={tokens}: ctas {ca}/{cm}; SM targets {ta}/{tm}; split {wave} (wave rule) {split_times[wave]:.3f} ms; naive "
                 f"{extra['naive_split_ms']:.3f} ms; best of the rule's top {len(shortlist)} {short} "
                 f"{extra['shortlist_ms']:.3f} ms" + (f"; exhaustive best {best} {split_times[best]:.3f} ms, "
                 f"wave/best {extra['wave_vs_best']:.4f}, shortlist/best {extra['shortlist_vs_best']:.4f}"
                 if not args.no_exhaustive else "") + f"; unsplit (fused, every SM) {unsplit_ms:.3f} ms"
                 + ("" if choice.split else " -> do not split") + f"  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    dist.shutdown(main())
