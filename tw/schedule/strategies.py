"""The strategies: how one forward pass orders compute and communication.

A strategy is built once per model (`make`), then for each batch:

    plan = strategy.prepare(batch)       # host work: metadata to the device (outside any timing)
    out = strategy.forward(plan, stream) # launches only; returns the final normed hidden states [T, H]

| name        | per row-parallel GEMM                                                     |
|-------------|---------------------------------------------------------------------------|
| nccl        | GEMM -> NCCL all-reduce (all tokens) -> fused add + RMSNorm (all tokens)   |
| nocomm      | the same with the all-reduce removed (upper bound; output not the model's) |
| fused       | GEMM into the registered buffer -> fused AR + add + RMSNorm (1/TP of rows) |
| finegrained | GEMM in k token chunks; chunk i's NCCL all-reduce (comm stream) overlaps chunk i+1's GEMM, then add + RMSNorm |
| tokenweave  | batch split in halves A/B; the fused AR + norm of one half (high-priority comm stream, few CTAs) overlaps the other half's compute |

On the CPU every schedule runs its steps in the same order on one "stream", so CPU tests check the
data flow (which rows, which halves, which norm weight) of exactly the code the GPU runs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from tw import ops
from tw import comm as transports
from tw.model.batch import Batch
from tw.model.layers import attention_block, mlp_block
from tw.model.model import Model
from tw.measure.trace import span

STRATEGIES = ("nccl", "nocomm", "fused", "finegrained", "tokenweave")


def transport_for(kind: str, model: Model, world, sharded: bool, p2p: dict | None = None):
    """The strategy's transport, sized for the model (tw/comm.make). p2p runs two-shot only: at 64-256
    rows the one-shot path measured slower at 8 CTAs and equal at 64-132
    (experiments/results/kernels-H200x2-run14.jsonl). "p2p-pull" is p2p with the pulled fused kernel
    (P2PComm(pull=True)). p2p: the P2P kernels' build options (P2PComm's cluster, runtime_tp; default:
    plain CTAs, TP compiled in)."""
    options = {}
    if kind == "p2p-pull":
        kind, options["pull"] = "p2p", True
    if kind == "p2p" and world.is_gpu:
        options.update(p2p or {}, oneshot_max_tokens=0)
    if model.emulation is not None:
        options["emulate"] = model.emulation
    return transports.make(kind, world, model.cfg.hidden, model.max_tokens, model.dtype, sharded=sharded, **options)


@dataclass(frozen=True)
class Plan:
    """Everything one forward pass depends on, fixed before it runs (forward is a function of the plan).

    parts: the device-side Parts (one, or tokenweave's halves A and B). ctas: CTA budget of the fused
    kernel for every comm step of a one-part plan (None: the transport's default or not applicable);
    ctas_attn / ctas_mlp: tokenweave's budgets for the comm that overlaps attention / the MLP.
    split_source: how tokenweave's split was decided (tuned, tuned-unsplit, wave, naive, forced,
    below-threshold); None for the other strategies. sm_target_attn / sm_target_mlp: the cuBLAS SM-count
    target of tokenweave's attention / MLP GEMMs, which run beside the ctas_attn / ctas_mlp comm (None:
    no target)."""
    batch: Batch
    parts: tuple
    ctas: int | None = None
    ctas_attn: int | None = None
    ctas_mlp: int | None = None
    split_source: str | None = None
    sm_target_attn: int | None = None
    sm_target_mlp: int | None = None

    @property
    def split_at(self) -> int | None:
        return self.parts[1].offset if len(self.parts) == 2 else None


class Sequential:
    """Layer after layer on one stream; each row-parallel GEMM feeds comm.ar_add_norm in the
    transport's order (nccl, nocomm: unsharded; fused: sharded). ctas: the fused kernel's budget."""

    def __init__(self, name: str, model: Model, comm, ctas: int | None = None):
        self.name, self.model, self.comm, self.ctas = name, model, comm, ctas

    def prepare(self, batch: Batch, ids=None, fill_prefix: bool = True) -> Plan:
        """fill_prefix=False keeps the cache as it is: a serving engine's prefix K/V are real, written
        by its earlier steps (tw/serve/engine.py), and must not be replaced by the seeded ones."""
        if fill_prefix:
            self.model.load_prefix(batch)
        return Plan(batch, (self.model.part(batch, ids),), ctas=self.ctas)

    def forward(self, plan: Plan, stream=None):
        m, comm, (part,) = self.model, self.comm, plan.parts
        m.bind_x(comm)
        r, eps = part.rows, m.cfg.eps
        x, residual = m.ws.x, m.ws.residual
        m.embed(part, stream)
        for i, w in enumerate(m.layers):
            y = comm.staging(part.offset + part.num_tokens)[r]
            attention_block(m, w, x[r], part, y, stream)
            with span(f"L{i}.comm.{part.label}.post_attn_norm", stream):
                comm.ar_add_norm(r.start, r.stop, residual, w.post_norm, eps, x, stream, ctas=plan.ctas)
            mlp_block(m, w, x[r], part, y, stream)
            with span(f"L{i}.comm.{part.label}.{_next_norm(m, i)}", stream):
                comm.ar_add_norm(r.start, r.stop, residual, m.norm_weight_after(i), eps, x, stream, ctas=plan.ctas)
        return x[r]


def _next_norm(model, layer: int) -> str:
    return "next_norm" if layer + 1 < len(model.layers) else "final_norm"


class _Streams:
    """The compute stream (the caller's) and a high-priority comm stream, with events between them.

    Event objects are reused: a wait binds to the event's latest record at the time it is issued, and
    every record/wait below is issued in program order, so reuse is safe (also under graph capture)."""

    def __init__(self, world):
        self.gpu = world.is_gpu
        if self.gpu:
            import cupy as cp
            # CUDA clamps a priority outside the device's range to the nearest end: -100 is "highest".
            self.comm = cp.cuda.Stream(non_blocking=True, priority=-100)
            self._events = {}
        else:
            self.comm = None

    def signal(self, name: str, stream):
        """Record event `name` on `stream` (None: the current stream)."""
        if self.gpu:
            import cupy as cp
            if name not in self._events:  # created once, outside any later capture
                self._events[name] = cp.cuda.Event(disable_timing=True)
            self._events[name].record(stream or cp.cuda.get_current_stream())

    def wait(self, stream, name: str):
        """Make `stream` (None: the current stream) wait for the latest record of event `name`."""
        if self.gpu:
            import cupy as cp
            (stream or cp.cuda.get_current_stream()).wait_event(self._events[name])


class FineGrained:
    """Row-parallel GEMMs in k token chunks: chunk i's NCCL all-reduce (comm stream) overlaps chunk i+1's
    GEMM (compute stream); the fused add + RMSNorm runs on all tokens once every chunk is reduced."""

    def __init__(self, model: Model, comm, k: int, world):
        if k < 1:
            raise ValueError(f"finegrained needs k >= 1 chunks, got {k}")
        self.name, self.model, self.comm, self.k, self.ctas = f"finegrained{k}", model, comm, k, None
        self.streams = _Streams(world)

    prepare = Sequential.prepare

    def _chunks(self, part):
        n, k = part.num_tokens, min(self.k, part.num_tokens)
        bounds = [part.offset + (n * i) // k for i in range(k + 1)]
        return list(zip(bounds[:-1], bounds[1:]))

    def _chunked(self, compute, chunks, stream, name):
        """compute(c, lo, hi) writes the partial sums of rows [lo, hi) on `stream`; each chunk's
        all-reduce then runs on the comm stream beside the next chunk's compute. name: e.g.
        'L3.attn.o_proj'; chunk c's all-reduce is traced as L3.comm.c<c>.o_proj_allreduce."""
        comm_stream = self.streams.comm or stream
        layer, block, op = name.split(".")
        tag = f"{block}{op}"
        for c, (lo, hi) in enumerate(chunks):
            compute(c, lo, hi)
            self.streams.signal(f"{tag}{c}", stream)
            self.streams.wait(comm_stream, f"{tag}{c}")
            with span(f"{layer}.comm.c{c}.{op}_allreduce", comm_stream, "comm"):
                self.comm.all_reduce(lo, hi, comm_stream)
        self.streams.signal(f"{tag}done", comm_stream)
        self.streams.wait(stream, f"{tag}done")

    def _row_parallel(self, inp, w, y_full, chunks, stream, name):
        """The row-parallel GEMM chunk by chunk (traced as L3.attn.c<c>.o_proj)."""
        layer, block, op = name.split(".")

        def gemm(c, lo, hi):
            with span(f"{layer}.{block}.c{c}.{op}", stream):
                ops.linear(inp[lo:hi], w, y_full[lo:hi], stream)

        self._chunked(gemm, chunks, stream, name)

    def _moe_chunks(self, w, part, y, chunks, stream, name):
        """The MoE block chunk by chunk: each chunk routes, permutes and runs its experts on its own
        tokens (its down GEMMs are per expert, so there is no one row-parallel GEMM to cut)."""
        def block(c, lo, hi):
            sub = replace(part, offset=lo, num_tokens=hi - lo, label=f"c{c}")
            mlp_block(self.model, w, self.model.ws.x[lo:hi], sub, y[lo:hi], stream)

        self._chunked(block, chunks, stream, name)

    def forward(self, plan: Plan, stream=None):
        m, (part,) = self.model, plan.parts
        m.bind_x(self.comm)
        r, eps, ws = part.rows, m.cfg.eps, m.ws
        y = self.comm.staging(part.offset + part.num_tokens)
        chunks = self._chunks(part)
        m.embed(part, stream)
        for i, w in enumerate(m.layers):
            attention_block(m, w, ws.x[r], part, None, stream)   # stops before o_proj
            self._row_parallel(ws.attn, w.wo, y, chunks, stream, f"L{i}.attn.o_proj")
            with span(f"L{i}.norm.all.post_attn_norm", stream):
                ops.add_rmsnorm(y[r], ws.residual[r], w.post_norm, eps, ws.x[r], stream)
            if m.cfg.num_experts:   # MoE: each chunk is a block of its own (its down GEMMs are per expert)
                self._moe_chunks(w, part, y, chunks, stream, f"L{i}.mlp.down")
            else:
                mlp_block(m, w, ws.x[r], part, None, stream)     # stops before down_proj
                self._row_parallel(ws.act, w.wdown, y, chunks, stream, f"L{i}.mlp.down")
            with span(f"L{i}.norm.all.{_next_norm(m, i)}", stream):
                ops.add_rmsnorm(y[r], ws.residual[r], m.norm_weight_after(i), eps, ws.x[r], stream)
        return ws.x[r]


class TokenWeave:
    """The 8-step overlap schedule (docs/design.md#schedule) over halves A = [0, s) and B = [s, T).

    Compute stream: attn(A), attn(B), mlp(A), mlp(B) per layer. Comm stream (high priority): the fused
    AR + add + RMSNorm of the half that just finished, while the other half computes. Each step waits
    only for the step whose output it consumes:
        attn(A)_L  <- norm(A, MLP)_{L-1}      norm(A, attn)_L <- attn(A)_L
        attn(B)_L  <- norm(B, MLP)_{L-1}      norm(B, attn)_L <- attn(B)_L
        mlp(A)_L   <- norm(A, attn)_L         norm(A, MLP)_L  <- mlp(A)_L
        mlp(B)_L   <- norm(B, attn)_L         norm(B, MLP)_L  <- mlp(B)_L
    The staging rows of a half are rewritten only after the comm step that read them has finished
    (the compute step that rewrites them waits for it), and halves use disjoint workspace rows.
    The split point, the CTA budgets (ctas_attn: the comm steps that overlap attention, norm(B, MLP)
    and norm(A, attn); ctas_mlp: those that overlap the MLP, norm(B, attn) and norm(A, MLP)) and the
    GEMMs' SM targets are the policy's (tw/schedule/policy.py). An unsplit batch runs the fused
    strategy alone, with `unsplit_ctas` (every SM: nothing overlaps the comm then).
    """

    def __init__(self, model: Model, comm, world, policy, unsplit_ctas: int | None = None):
        self.name, self.model, self.comm = "tokenweave", model, comm
        self.policy, self.unsplit_ctas = policy, unsplit_ctas
        self.streams = _Streams(world)
        self.unsplit = Sequential("fused", model, comm)

    def prepare(self, batch: Batch, ids=None, choice=None, fill_prefix: bool = True) -> Plan:
        """The plan for `batch`, as self.policy.decide says. choice (a tw.schedule.tuned.TunedChoice, from
        tune.py or built by a script to force a setting) overrides the policy: its split point, or no
        split, its CTA budgets and its SM targets. fill_prefix: as in Sequential.prepare."""
        if fill_prefix:
            self.model.load_prefix(batch)
        n = batch.num_tokens
        d = self.policy.decide(n, forced=choice)
        if d.split_at is None:
            return Plan(batch, (self.model.part(batch, ids),), ctas=self.unsplit_ctas, split_source=d.source)
        if not 0 < d.split_at < n:
            raise ValueError(f"split point {d.split_at} for {n} tokens must lie strictly inside the batch")
        a, b = batch.split(d.split_at)
        return Plan(batch, (self.model.part(a, ids, "A"), self.model.part(b, ids, "B")), ctas_attn=d.ctas_attn,
                    ctas_mlp=d.ctas_mlp, split_source=d.source, sm_target_attn=d.sm_target_attn,
                    sm_target_mlp=d.sm_target_mlp)

    def forward(self, plan: Plan, stream=None):
        if len(plan.parts) == 1:
            return self.unsplit.forward(plan, stream)
        m, comm, st = self.model, self.comm, self.streams
        m.bind_x(comm)
        a, b = plan.parts
        eps, x, res = m.cfg.eps, m.ws.x, m.ws.residual
        cs = st.comm or stream                      # comm stream (the same stream on CPU)
        y = comm.staging(b.offset + b.num_tokens)
        m.embed(a, stream)
        m.embed(b, stream)
        st.signal("normB_mlp", stream)              # B's layer-0 input is ready (no comm needed)
        st.signal("normA_mlp", stream)

        def norm(name, part, weight, ctas, after, done):
            st.wait(cs, after)
            with span(name, cs, "comm"):
                comm.ar_add_norm(part.rows.start, part.rows.stop, res, weight, eps, x, cs, sharded=True, ctas=ctas)
            st.signal(done, cs)

        ca, cm = plan.ctas_attn, plan.ctas_mlp
        ta, tm = plan.sm_target_attn, plan.sm_target_mlp   # the GEMMs' SM-count targets beside ca / cm
        for i, w in enumerate(m.layers):
            nxt = _next_norm(m, i)
            st.wait(stream, "normA_mlp")
            # layer 0: no comm before attn(A), so no target; later layers: beside norm(B, MLP), ctas_attn
            attention_block(m, w, x[a.rows], a, y[a.rows], stream, None if i == 0 else ta)
            st.signal("attnA", stream)
            norm(f"L{i}.comm.A.post_attn_norm", a, w.post_norm, ca, "attnA", "normA_attn")
            st.wait(stream, "normB_mlp")
            attention_block(m, w, x[b.rows], b, y[b.rows], stream, ta)   # beside norm(A, attn): ctas_attn
            st.signal("attnB", stream)
            norm(f"L{i}.comm.B.post_attn_norm", b, w.post_norm, cm, "attnB", "normB_attn")
            st.wait(stream, "normA_attn")
            mlp_block(m, w, x[a.rows], a, y[a.rows], stream, tm)          # beside norm(B, attn): ctas_mlp
            st.signal("mlpA", stream)
            norm(f"L{i}.comm.A.{nxt}", a, m.norm_weight_after(i), cm, "mlpA", "normA_mlp")
            st.wait(stream, "normB_attn")
            mlp_block(m, w, x[b.rows], b, y[b.rows], stream, tm)          # beside norm(A, MLP): ctas_mlp
            st.signal("mlpB", stream)
            norm(f"L{i}.comm.B.{nxt}", b, m.norm_weight_after(i), ca, "mlpB", "normB_mlp")
        st.wait(stream, "normA_mlp")                # join: the caller's stream sees both halves done
        st.wait(stream, "normB_mlp")
        return x[a.offset:b.offset + b.num_tokens]


def finegrained_k(name: str, default: int = 4) -> int | None:
    """k of 'finegrained<k>' (bare 'finegrained' means k = default = 4); None if not finegrained."""
    if not name.startswith("finegrained"):
        return None
    tail = name[len("finegrained"):]
    if tail and not tail.isdigit():
        return None
    return int(tail) if tail else default


def make(name: str, model: Model, world, transport: str = "p2p", ctas: int | None = None,
         split: str = "wave", ctas_mlp: int | None = None, profile=None, min_split_tokens: int = 1024,
         sm_target: str = "tuned", tuned_file: str | None = None, p2p: dict | None = None):
    """Build strategy `name` for `model`.

    transport: what fused/tokenweave communicate with (p2p, or nccl = reduce-scatter + norm + all-gather);
    p2p: the P2P kernels' build options (transport_for).
    ctas / ctas_mlp: CTA budgets of the fused kernel (fused: default every SM, nothing to overlap;
    tokenweave: the comm overlapping attention / the MLP, default the transport's own, 8 for p2p).
    finegrained<k>: k chunks (bare finegrained: k = 4).
    tokenweave: split ("tuned", "wave" or "naive"), ctas, ctas_mlp, sm_target ("tuned", "left" or "off"),
    min_split_tokens and tuned_file are its policy's flags (tw/schedule/policy.py); the tuned choices
    come later (strategy.policy = strategy.policy.with_tuned(...)). profile: the wave rule's GEMM
    profile (default: measured for the model, tw/schedule/profile.py).
    """
    every_sm = world.sm_count or None  # None on the CPU, where CTAs mean nothing
    if model.emulation is not None and (name == "nccl" or finegrained_k(name) is not None):
        raise ValueError(f"strategy {name} cannot run on an emulated rank: it needs NCCL between real ranks "
                         "(nccl is projected instead: tw/comm/emulation.py)")
    if name == "nccl":
        return Sequential(name, model, transport_for("nccl", model, world, sharded=False))
    if name == "nocomm":
        return Sequential(name, model, transport_for("none", model, world, sharded=False))
    if name == "fused":
        return Sequential(name, model, transport_for(transport, model, world, sharded=True, p2p=p2p),
                          ctas=ctas or every_sm)
    k = finegrained_k(name)
    if k is not None:
        return FineGrained(model, transport_for("nccl", model, world, sharded=False), k, world)
    if name == "tokenweave":
        from tw.schedule import split as splitting
        from tw.schedule.policy import Flags, Policy
        flags = Flags(split, ctas, ctas_mlp, sm_target, min_split_tokens, tuned_file)
        rule = splitting.split_rule(flags.rule, model, world, profile)
        comm = transport_for(transport, model, world, sharded=True, p2p=p2p)
        policy = Policy(flags, rule, default_ctas=getattr(comm, "ctas", None), sm_count=world.sm_count)
        return TokenWeave(model, comm, world, policy, unsplit_ctas=every_sm)
    raise ValueError(f"unknown strategy {name!r}; expected one of {STRATEGIES} (finegrained<k> for k chunks)")
