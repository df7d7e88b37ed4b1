"""Which tuned choices tokenweave takes in a run of experiments/latency.py or throughput.py: those of
--tuned-file, else those tune.py saved for exactly this setting (tw/schedule/tuned.py), said on rank 0.
Its policy then weighs them against the flags (tw/schedule/policy.py)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from experiments import common
from tw.runtime import dist
from tw.schedule import tuned


def use(args, world, cfg, strategies, seq_len, tokens=()) -> None:
    """Hand tokenweave, where it is among `strategies`, this run's tuned choices (load): its
    policy weighs them against the flags (tw/schedule/policy.py)."""
    for strat in strategies:
        if strat.name == "tokenweave":
            found = load(args, world, cfg, strat.policy.flags, seq_len, tokens)
            strat.policy = strat.policy.with_tuned(found)


def load(args, world, cfg, flags, seq_len, tokens=()) -> dict:
    """{tokens: tune.py's choice} for tokenweave in this run, saying on rank 0 where they come from;
    tw/schedule/policy.Policy.decide weighs them against the flags (`flags`, a policy.Flags).

    The choices of --tuned-file, else those of exactly this setting. A choice holds only for the batch it
    was tuned on, and the key's seq_len says which batch that was: prefill sequences of seq_len tokens.
    seq_len "all" (one prompt per batch): the batch of T tokens is one sequence of T, which is what
    tune.py measured with --seq-len T --tokens T, so each T of `tokens` uses the file keyed seq_len = T
    and only its entry for T (that file's other token counts were batches of several sequences)."""
    if flags.split != "tuned" or not world.is_gpu:
        return {}
    if flags.tuned_file:
        return from_file(flags.tuned_file, tokens, world)
    one_prompt = seq_len == "all"
    keys = ([common.tuning_key(args, world, cfg, t) for t in dict.fromkeys(tokens)] if one_prompt
            else [common.tuning_key(args, world, cfg, seq_len)])
    found, used, missing = {}, [], []
    for key in keys:
        got = tuned.load(key)
        if one_prompt:
            got = {t: c for t, c in got.items() if t == key.seq_len}
        if got:
            found.update(got)
            used.append(key.path.name)
        else:
            missing.append(key)
    if missing and not one_prompt:
        world.print0(f"tokenweave: {tuned.mismatch(missing[0]) or 'no tuned choices for this setting'}; "
                     "using the wave rule and the CTA flags")
    elif missing:
        world.print0(f"tokenweave: no choices tuned on one prompt of {sorted(k.seq_len for k in missing)} tokens "
                     f"(tune.py --seq-len T --tokens T, {cfg.num_layers} layers); the wave rule and the CTA flags "
                     "there")
    if not found:
        return {}
    if not flags.takes_tuned:
        world.print0("tokenweave: --ctas/--ctas-mlp given: tuned choices ignored")
        return {}
    world.print0(f"tokenweave: tuned split and CTA budgets from {', '.join(used)} for tokens {sorted(found)}")
    return found


def from_file(path, tokens, world) -> dict:
    """{tokens: choice} of a tuned file named by --tuned-file, for those of `tokens` it holds."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        got = {int(t): tuned.TunedChoice(**c) for t, c in data["tokens"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise dist.UsageError(f"--tuned-file {path}: not a readable tuned file ({type(e).__name__}: {e})") from None
    got = {t: dataclasses.replace(c, extra={**c.extra, "source": f"file:{path.name}"}) for t, c in got.items()
           if t in tokens}
    world.print0(f"tokenweave: split and CTA budgets from {path.name} (tuned for {data.get('key')}) for tokens "
                 f"{sorted(got)}; the wave rule elsewhere")
    return got
