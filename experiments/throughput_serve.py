"""One serving run of experiments/throughput.py: the step loop over tw/serve/engine.py's scheduler with one
strategy (schedule, prepare, forward, LM head, commit), its per-step records (host, launch, forward and
GPU times) and their medians; for --check, the captured requests' logits and MoE routing.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import NamedTuple

import numpy as np

from experiments import common
from tw.runtime import dist
from tw.serve import engine

PROGRESS_S = 2.0   # seconds between progress lines


def serve(strat, model, head, world, requests, chunk, kv, args, stream, label, stop_after=None, capture=()):
    """Run the workload to completion (or `stop_after` steps: warm-up). Returns the finished scheduler,
    the per-step records and, for request ids in `capture`, the full logits of their first and last
    output step (--check; that gather is left out of every time, the timeline included)."""
    sched = engine.Scheduler(engine.clone(requests), chunk, kv, args.max_seqs)
    kw = {"fill_prefix": False}
    ev = [model.xp.cuda.Event() for _ in range(3)] if world.is_gpu else None

    def mark(i):  # CUDA events on the stream: the forward's and the LM head's GPU time
        if ev:
            ev[i].record(stream)

    records, logits, paused = [], {}, 0.0
    routing = {}   # MoE --check: rid -> {layer: [prompt + output, k]} the engine's experts per position
    start = last_print = time.perf_counter()
    while not sched.done and (stop_after is None or sched.steps < stop_after):
        if sched.steps >= args.max_steps:
            raise RuntimeError(f"{label}: more than --max-steps {args.max_steps} steps (the dry run said fewer)")
        with dist.step(f"{label}: step {sched.steps}"):
            h0 = time.perf_counter()
            step = sched.schedule()
            plan = strat.prepare(step.batch, step.ids, **kw)   # tokenweave: as its policy decides
            record = bool(model.cfg.num_experts and capture and any(r.rid in capture for r in step.requests))
            model.routing = {} if record else None
            h1 = time.perf_counter()
            mark(0)
            out = strat.forward(plan, stream)
            h2 = time.perf_counter()
            mark(1)
            head.launch(out, step.produce_rows, stream)
            mark(2)
            tokens = head.finish()
            if ev:
                ev[2].synchronize()              # also when no row produced a token (nothing waited)
            now = time.perf_counter()
            if ev:
                fwd_ms, gpu_ms = (model.xp.cuda.get_elapsed_time(ev[0], e) for e in ev[1:])
            else:
                fwd_ms, gpu_ms = (h2 - h1) * 1e3, (now - h1) * 1e3
            want = [j for j, r in enumerate(step.producers) if r.rid in capture
                    and len(r.output) in (0, r.output_len - 1)]
            for j, row in zip(want, head.full_logits(want) if want else []):
                logits.setdefault(step.producers[j].rid, []).append(row)
            if record:
                keep_routing(routing, step, model.routing, capture, model.cfg.top_k)
                model.routing = None
            h3 = time.perf_counter()
            sched.commit(step, tokens, now - start - paused)   # the step's end on the run's timeline
            paused += h3 - now
            h4 = time.perf_counter()
        records.append(StepRecord(step.num_tokens, step.decode_tokens, len(step.batch.seqs), (h1 - h0 + h4 - h3) * 1e3,
                                  (h2 - h1) * 1e3, fwd_ms, gpu_ms, (now - h0 + h4 - h3) * 1e3, plan.split_source))
        if stop_after is None and h4 - last_print > PROGRESS_S:
            last_print = h4
            made = sum(r.prompt_len + len(r.output) for r in sched.finished)
            world.print0(f"  {label}: {len(sched.finished)}/{len(requests)} requests, step {sched.steps}, "
                         f"{made / (h4 - start - paused):,.0f} tok/s (finished requests)")
    strat.comm.check()
    return sched, records, logits, routing


def keep_routing(routing, step, recorded, capture, top_k):
    """The experts the step chose for the captured requests' tokens, stored by token position (the
    reference recomputes each request as one sequence: tw/reference.forward's `routing`)."""
    for s, (seq, r) in enumerate(zip(step.batch.seqs, step.requests)):
        if r.rid not in capture:
            continue
        lo, hi = int(step.batch.cu_seqlens[s]), int(step.batch.cu_seqlens[s + 1])
        mine = routing.setdefault(r.rid, {})
        for layer, rec in recorded.items():
            arr = mine.setdefault(layer, np.full((r.prompt_len + r.output_len, top_k), -1, np.int64))
            arr[seq.prefix:seq.prefix + seq.new] = rec[lo:hi]


class StepRecord(NamedTuple):
    tokens: int
    decodes: int
    seqs: int
    host_ms: float      # scheduling + prepare + commit (perf_counter)
    launch_ms: float    # issuing the forward (perf_counter)
    forward_ms: float   # the forward on the stream (CUDA events; CPU: perf_counter)
    gpu_ms: float       # the forward + the LM head on the stream
    step_ms: float      # the whole step, wall time
    split_source: str | None


def step_stats(world, records) -> dict:
    """Per-step medians and p99 over the run: rank 0's wall times; host and GPU times the slowest rank's."""
    col = {f: np.array([getattr(r, f) for r in records], dtype=np.float64) for f in StepRecord._fields[:-1]}
    mine = np.array([np.median(col[f]) for f in ("host_ms", "launch_ms", "forward_ms", "gpu_ms")])
    worst = np.empty_like(mine)
    world.comm.Allreduce(mine, worst, op=common._max())
    host, launch, fwd, gpu = (float(v) for v in worst)
    sources = Counter(r.split_source for r in records if r.split_source)
    return {"steps": len(records), "tokens_per_step_mean": float(col["tokens"].mean()),
            "decode_tokens_per_step_mean": float(col["decodes"].mean()),
            "seqs_per_step_mean": float(col["seqs"].mean()),
            "step_ms_median": float(np.median(col["step_ms"])), "step_ms_p99": float(np.percentile(col["step_ms"], 99)),
            "host_ms_median": host, "launch_ms_median": launch, "forward_ms_median": fwd, "gpu_ms_median": gpu,
            "host_over_gpu": host / gpu if gpu > 0 else None,
            "split_steps": sum(n for k, n in sources.items() if k not in ("below-threshold", "tuned-unsplit")),
            "split_sources": dict(sources) or None}
