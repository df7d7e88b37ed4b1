"""Race check of the two-stream schedules, on the CPU: records every op and every event record/wait the
schedule issues (the same calls the GPU path makes), replays them as a model of asynchronous streams,
and checks that every op runs after the ops whose results it reads and whose inputs it overwrites.

Model: each stream runs its ops in issue order; `wait(S, e)` makes later ops on S wait for everything
issued on the recording stream up to the latest `signal(e)` before the wait was issued (CUDA event
semantics). Run as `mpiexec -n 2 python -m tests.mpi_sync` (tests/test_schedules.py).
"""
from __future__ import annotations

from tw.model import config
from tw.model import batch as batching
from tw.runtime import dist
from tw.schedule import strategies as schedules
from tw.measure import trace
from tw.model.model import Model


class Log:
    """Ops and sync calls in issue order, turned into a happens-before relation."""

    def __init__(self):
        self.items = []

    def append(self, span):  # called by tw.measure.trace.span as tracer.spans.append((name, lane, start, end))
        name, _, stream, _ = span
        self.items.append(("op", name, stream))

    def happens_before(self):
        """op name -> set of op names guaranteed complete before it starts (names are unique per run)."""
        done_on = {}      # stream -> ops issued on it so far (they complete in order)
        known = {}        # stream -> ops an op issued next on it is guaranteed to follow
        events = {}       # event name -> ops complete when its latest record fires
        before = {}
        for kind, a, b in self.items:
            if kind == "op":
                name, stream = a, b
                assert name not in before, f"op name {name} issued twice"
                before[name] = set(known.get(stream, set())) | set(done_on.get(stream, []))
                done_on.setdefault(stream, []).append(name)
            elif kind == "signal":
                name, stream = a, b
                events[name] = set(done_on.get(stream, [])) | known.get(stream, set())
            elif kind == "wait":
                stream, name = a, b
                known[stream] = known.get(stream, set()) | events[name]
        self.final = {s: set(done_on.get(s, [])) | known.get(s, set()) for s in done_on}
        return before


class FakeStreams:
    def __init__(self, log):
        self.log, self.comm = log, "comm"

    def signal(self, name, stream):
        self.log.items.append(("signal", name, stream))

    def wait(self, stream, name):
        self.log.items.append(("wait", stream, name))


class FakeTracer:
    def __init__(self, log):
        self.spans = log

    def _mark(self, stream):
        return stream


def record(strat, plan):
    log = Log()
    strat.streams = FakeStreams(log)
    trace._active = FakeTracer(log)
    try:
        strat.forward(plan, "compute")
    finally:
        trace._active = None
    return log


def check(before, must):
    for later, earlier in must:
        assert earlier in before[later], f"race: {later} may run before {earlier} has finished"


def main():
    world = dist.init(None, "cpu")
    cfg = config.get("tiny")
    layers = range(cfg.num_layers)
    b = batching.mixed([(40, 0), (30, 5), (26, 0)])
    model = Model(cfg, world, b.num_tokens, b.kv_capacity, seed=3)

    tw = schedules.make("tokenweave", model, world, min_split_tokens=16)
    log = record(tw, tw.prepare(b))
    hb = log.happens_before()
    must = []
    for i in layers:
        nxt = "next_norm" if i + 1 < cfg.num_layers else "final_norm"
        for h in "AB":
            must += [(f"L{i}.comm.{h}.post_attn_norm", f"L{i}.attn.{h}.o_proj"),     # reads y[h]
                     (f"L{i}.comm.{h}.post_attn_norm", f"L{i}.attn.{h}.qkv_gemm"),   # overwrites x[h]
                     (f"L{i}.mlp.{h}.gate_up", f"L{i}.comm.{h}.post_attn_norm"),     # reads x[h]
                     (f"L{i}.mlp.{h}.down", f"L{i}.comm.{h}.post_attn_norm"),        # overwrites y[h]
                     (f"L{i}.comm.{h}.{nxt}", f"L{i}.mlp.{h}.down"),                 # reads y[h]
                     (f"L{i}.comm.{h}.{nxt}", f"L{i}.mlp.{h}.gate_up")]              # overwrites x[h]
            if i + 1 < cfg.num_layers:
                must += [(f"L{i + 1}.attn.{h}.qkv_gemm", f"L{i}.comm.{h}.next_norm"),   # reads x[h]
                         (f"L{i + 1}.attn.{h}.o_proj", f"L{i}.comm.{h}.next_norm")]     # overwrites y[h]
        must.append((f"L{i}.attn.B.attention", f"L{i}.attn.A.rope"))  # B reads A's K/V (the cut request)
    check(hb, must)
    last = cfg.num_layers - 1
    assert {f"L{last}.comm.A.final_norm", f"L{last}.comm.B.final_norm"} <= log.final["compute"], \
        "the caller's stream does not wait for the final norms"
    overlapped = [n for n in hb if n.startswith("L0.comm.A.post_attn_norm")]
    assert overlapped and "L0.attn.B.qkv_gemm" not in hb["L0.comm.A.post_attn_norm"], \
        "A's comm is ordered after B's compute: nothing would overlap"
    world.print0(f"PASS tokenweave: {len(must)} orderings hold, halves overlap, final join present")

    fg = schedules.make("finegrained4", model, world)
    log = record(fg, fg.prepare(b))
    hb = log.happens_before()
    must = []
    for i in layers:
        for c in range(4):
            must += [(f"L{i}.comm.c{c}.o_proj_allreduce", f"L{i}.attn.c{c}.o_proj"),
                     (f"L{i}.norm.all.post_attn_norm", f"L{i}.comm.c{c}.o_proj_allreduce"),
                     (f"L{i}.comm.c{c}.down_allreduce", f"L{i}.mlp.c{c}.down"),
                     (f"L{i}.mlp.c{c}.down", f"L{i}.comm.c{c}.o_proj_allreduce")]
    check(hb, must)
    assert "L0.attn.c1.o_proj" not in hb["L0.comm.c0.o_proj_allreduce"], "chunk 0's all-reduce cannot overlap"
    world.print0(f"PASS finegrained4: {len(must)} orderings hold, chunks overlap")


if __name__ == "__main__":
    main()
    dist.shutdown(0)
