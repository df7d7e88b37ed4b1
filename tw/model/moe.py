"""The mixture-of-experts block (Mixtral): the MLP block of an MoE model, on the CPU (NumPy) and the GPU.

Same contract as tw/layers.mlp_block: x [n, H] (normed input) -> y [n, H], this rank's partial sum,
written into the transport's staging rows; the schedule's fused all-reduce + add + RMSNorm then runs
unchanged. Every expert is TP-sharded like the dense MLP (gate_up by rows: [E, 2 F/tp, H]; down by
columns: [E, H, F/tp]), so the partial outputs of the ranks add up to the block's output, and the
router is replicated (every rank routes every token the same way: same x, same weights, same GEMM).

Steps (the GPU kernels are cuda/moe.cu, called through tw/ops/moe.py):
1. router GEMM: logits [n, E] = x @ w_router^T, kept in float32 (on the GPU a bf16-in, float32-out
   GEMM: logits rounded to bf16's 8 bits would tie a token's k-th and (k+1)-th choices far more often);
2. top-k by logit (highest first, the lower expert index on ties), softmax over the k selected logits
   (the renormalised weights: equal to Mixtral's softmax over all E followed by top-k and renormalising);
3. permutation: the n k (token, slot) pairs sorted by expert, stably (token order within an expert),
   and the token rows gathered into that order;
4. per expert e, on its contiguous rows: gate_up GEMM, SiLU * mul, down GEMM (on the GPU a loop of
   cuBLAS GEMMs, the default, or one cuBLAS grouped GEMM per projection: moe_forward's gemm_mode);
5. un-permute: y[t] = sum_j weight[t, j] * out[row of (t, j)], float32 sums rounded once.

The expert GEMMs need each expert's row count on the host (cuBLAS takes sizes from the host), so the
GPU block reads the E + 1 offsets back after the permutation: one host wait per block. A forward pass
of an MoE model therefore runs eagerly (no CUDA graph); the GPU keeps the work queued before the wait
(e.g. the other half's communication in TokenWeave) running through it.

Routing is per token, so TokenWeave's halves (or FineGrained's chunks: each chunk is a block of its
own) route each token as the whole batch does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tw import ops
from tw.runtime.arrays import xp_of
from tw.measure.trace import span

# The GPU's expert GEMMs: a loop of cuBLAS GEMMs, or one cublasGemmGroupedBatchedEx per projection.
# The model runs the loop, the faster of the two (experiments/moe.py times both; docs/design.md#moe).
GEMM_MODES = ("loop", "grouped")
DEFAULT_GEMM_MODE = "loop"


def check_gemm_mode(mode: str) -> None:
    if mode not in GEMM_MODES:
        raise ValueError(f"MoE GEMM mode {mode!r}; choose one of {GEMM_MODES}")


@dataclass
class MoEWeights:
    router: object    # [E, H]            replicated
    gate_up: object   # [E, 2 F/tp, H]    each expert column-parallel (gate rows, then up rows)
    down: object      # [E, H, F/tp]      each expert row-parallel


@dataclass
class MoEBuffers:
    """The block's workspace for up to `max_tokens` tokens: token rows (logits, experts, weights) and
    k-times-as-many permuted rows; a part with workspace rows [o, o + n) uses token rows [o, o + n)
    and permuted rows [k o, k (o + n)), so TokenWeave's halves stay disjoint."""
    logits: object    # [T, E] float32
    experts: object   # [T, k] int (int64 on the CPU, int32 on the GPU)
    weights: object   # [T, k] float32
    xs: object        # [k T, H]       token rows in expert order
    gate_up: object   # [k T, 2 F/tp]
    act: object       # [k T, F/tp]
    out: object       # [k T, H]
    inverse: object   # [k T] int32    GPU only: the permuted row of each (token, slot)
    source: object    # [k T] int32    GPU only: the token of each permuted row
    offsets: object   # [E + 1] int32  GPU only (and its pinned host copy: offsets_host)
    offsets_host: object = None

    @classmethod
    def allocate(cls, xp, max_tokens: int, hidden: int, ffn_shard: int, num_experts: int, top_k: int, dtype):
        t, kt = max_tokens, top_k * max_tokens
        gpu = xp is not np
        i32 = (lambda *s: xp.zeros(s, xp.int32)) if gpu else (lambda *s: None)
        b = cls(logits=xp.zeros((t, num_experts), xp.float32), experts=xp.zeros((t, top_k), xp.int32 if gpu else np.int64),
                weights=xp.zeros((t, top_k), xp.float32), xs=xp.zeros((kt, hidden), dtype),
                gate_up=xp.zeros((kt, 2 * ffn_shard), dtype), act=xp.zeros((kt, ffn_shard), dtype),
                out=xp.zeros((kt, hidden), dtype), inverse=i32(kt), source=i32(kt), offsets=i32(num_experts + 1))
        if gpu:
            from tw.ops.moe import pinned_int32
            b.offsets_host = pinned_int32(num_experts + 1)
        return b

    def rows(self, offset: int, n: int, top_k: int) -> "MoEBuffers":
        t, p = slice(offset, offset + n), slice(top_k * offset, top_k * (offset + n))
        cut = lambda a, r: None if a is None else a[r]
        return MoEBuffers(self.logits[t], self.experts[t], self.weights[t], self.xs[p], self.gate_up[p],
                          self.act[p], self.out[p], cut(self.inverse, p), cut(self.source, p), self.offsets,
                          self.offsets_host)

    @staticmethod
    def bytes(max_tokens: int, hidden: int, ffn_shard: int, num_experts: int, top_k: int, dtype_bytes: int) -> int:
        t, kt = max_tokens, top_k * max_tokens
        return t * (num_experts + 2 * top_k) * 4 + kt * (2 * hidden + 3 * ffn_shard) * dtype_bytes + 2 * kt * 4


def balanced_rows(num_tokens: int, num_experts: int, top_k: int) -> list:
    """The per-expert row counts of num_tokens tokens spread evenly: n k pairs over E experts, the
    remainder to the lowest experts (GEMM profiles: the wave-aware split, before any routing)."""
    q, r = divmod(num_tokens * top_k, num_experts)
    return [q + (e < r) for e in range(num_experts)]


def route(logits, top_k: int):
    """(experts [n, k] int64, weights [n, k] in logits' dtype): the k largest logits of each row, highest
    first (argmax: the lower index on ties), and the softmax over those k logits (NumPy; the GPU's is
    cuda/moe.cu's moe_topk_softmax)."""
    xp = xp_of(logits)
    n = logits.shape[0]
    rows = xp.arange(n)
    rest = logits.copy()
    experts = xp.empty((n, top_k), dtype=xp.int64)
    chosen = xp.empty((n, top_k), dtype=logits.dtype)
    for j in range(top_k):
        e = xp.argmax(rest, axis=1)
        experts[:, j] = e
        chosen[:, j] = logits[rows, e]
        rest[rows, e] = -xp.inf
    p = xp.exp(chosen - chosen[:, :1])      # chosen[:, 0] is the row's max
    return experts, p / p.sum(axis=1, keepdims=True)


def router_gap(logits, top_k: int):
    """[n]: the k-th largest logit minus the (k+1)-th (inf with k = E): how far each token is from
    picking another expert. A tiny gap means rounding could change the routing."""
    xp = xp_of(logits)
    if top_k >= logits.shape[1]:
        return xp.full(logits.shape[0], xp.inf)
    s = -xp.sort(-logits, axis=1)
    return s[:, top_k - 1] - s[:, top_k]


def permute(experts, num_experts: int):
    """(order [n k], offsets [E + 1], inverse [n k]) for experts [n, k] (host int arrays).

    order: the flat (token, slot) indices t * k + j sorted by expert, stably; expert e's rows are
    order[offsets[e]:offsets[e + 1]] (token order); inverse[t * k + j] = the permuted row of (t, j)."""
    flat = np.asarray(experts).reshape(-1)
    order = np.argsort(flat, kind="stable")
    offsets = np.zeros(num_experts + 1, dtype=np.int64)
    np.cumsum(np.bincount(flat, minlength=num_experts), out=offsets[1:])
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    return order, offsets, inverse


def moe_forward(x, moe: MoEWeights, top_k: int, bufs: MoEBuffers, y, name: str = "", stream=None,
                sm_target: int | None = None, gemm_mode: str = DEFAULT_GEMM_MODE):
    """The block on x [n, H] into y [n, H] (every row written). bufs: rows for n tokens
    (MoEBuffers.rows). Returns the per-expert row counts (host int array [E]). sm_target: the SM-count
    target of its GEMMs (tw.ops.linear); gemm_mode: the expert GEMMs on the GPU (GEMM_MODES)."""
    check_gemm_mode(gemm_mode)
    if x.shape[0] == 0:
        return np.zeros(moe.router.shape[0], np.int64)
    if ops.is_cpu(x):
        return _forward_cpu(x, moe, top_k, bufs, y, name, stream, sm_target)
    return _forward_gpu(x, moe, top_k, bufs, y, name, stream, sm_target, gemm_mode)


def _forward_cpu(x, moe, k, bufs, y, name, stream, sm_target):
    n, num_experts = x.shape[0], moe.router.shape[0]
    with span(name + "router", stream):
        ops.linear(x, moe.router, bufs.logits, stream, sm_target)
        experts, weights = route(bufs.logits, k)
        bufs.experts[...], bufs.weights[...] = experts, weights
    with span(name + "permute", stream):
        order, offsets, inverse = permute(experts, num_experts)
        np.take(x, order // k, axis=0, out=bufs.xs)
    _expert_gemms(bufs, moe, offsets, name, stream, sm_target)
    with span(name + "unpermute", stream):
        inv = inverse.reshape(n, k)
        acc = weights[:, 0, None] * bufs.out[inv[:, 0]]
        for j in range(1, k):
            acc += weights[:, j, None] * bufs.out[inv[:, j]]
        y[...] = acc
    return np.diff(offsets)


def _forward_gpu(x, moe, k, bufs, y, name, stream, sm_target, gemm_mode):
    from tw.ops import moe as moe_ops
    with span(name + "router", stream):
        route_gpu(x, moe, k, bufs, stream, sm_target)
    with span(name + "permute", stream):
        copied = permute_gpu(x, moe, bufs, stream)
        offsets = moe_ops.wait_offsets(copied, bufs.offsets_host)   # the one host wait (the gather runs meanwhile)
    _expert_gemms(bufs, moe, offsets, name, stream, sm_target, gemm_mode)
    with span(name + "unpermute", stream):
        unpermute_gpu(bufs, y, stream)
    return np.diff(offsets)


# The GPU block's phases (experiments/moe.py times each alone).
def route_gpu(x, moe, k, bufs, stream, sm_target=None):
    """Router GEMM (float32 logits), then top-k and softmax into bufs.experts / bufs.weights."""
    from tw.ops import moe as moe_ops
    ops.linear(x, moe.router, bufs.logits, stream, sm_target)
    moe_ops.topk_softmax(bufs.logits, k, bufs.experts, bufs.weights, stream)


def permute_gpu(x, moe, bufs, stream):
    """The permutation by expert (offsets, inverse, source), the offsets' copy to the host queued, then x's
    rows gathered into that order, so the gather runs while the host waits for the copy. Returns the
    copy's event (moe_ops.wait_offsets)."""
    from tw.ops import moe as moe_ops
    moe_ops.permute(bufs.experts, moe.router.shape[0], bufs.offsets, bufs.inverse, bufs.source, stream)
    copied = moe_ops.start_offsets_copy(bufs.offsets, bufs.offsets_host, stream)
    moe_ops.gather_rows(x, bufs.source, bufs.xs, stream)
    return copied


def unpermute_gpu(bufs, y, stream):
    """y = the weighted sum of each token's k expert outputs."""
    from tw.ops import moe as moe_ops
    moe_ops.unpermute(bufs.out, bufs.inverse, bufs.weights, y, stream)


def _expert_gemms(bufs, moe, offsets, name, stream, sm_target=None, gemm_mode=DEFAULT_GEMM_MODE):
    """gate_up, SiLU * mul and down of every expert on its rows [offsets[e], offsets[e + 1]); on the GPU
    as gemm_mode says (GEMM_MODES; the CPU always loops)."""
    check_gemm_mode(gemm_mode)
    nk = int(offsets[-1])
    spans = [(e, int(offsets[e]), int(offsets[e + 1])) for e in range(len(offsets) - 1) if offsets[e + 1] > offsets[e]]
    if gemm_mode == "grouped" and not ops.is_cpu(bufs.xs):
        from tw.ops import moe as moe_ops
        with span(name + "experts_gate_up", stream):
            moe_ops.grouped_linear(bufs.xs, moe.gate_up, bufs.gate_up, spans, 0, stream, sm_target)
        with span(name + "experts_act", stream):
            ops.silu_mul(bufs.gate_up[:nk], bufs.act[:nk], stream)
        with span(name + "experts_down", stream):
            moe_ops.grouped_linear(bufs.act, moe.down, bufs.out, spans, 1, stream, sm_target)
        return
    for e, lo, hi in spans:
        with span(f"{name}expert{e}.gate_up", stream):
            ops.linear(bufs.xs[lo:hi], moe.gate_up[e], bufs.gate_up[lo:hi], stream, sm_target)
    with span(name + "experts_act", stream):
        ops.silu_mul(bufs.gate_up[:nk], bufs.act[:nk], stream)
    for e, lo, hi in spans:
        with span(f"{name}expert{e}.down", stream):
            ops.linear(bufs.act[lo:hi], moe.down[e], bufs.out[lo:hi], stream, sm_target)


def moe_block(model, w, x, part, y, stream=None, sm_target: int | None = None):
    """tw/model/layers.mlp_block for an MoE layer, on the workspace rows of `part` (sm_target: as there).
    With model.routing a dict (a --check run), the chosen experts of every token are recorded there per
    layer (host int arrays [T, k]): the float64 reference follows them where its own choice is a near-tie."""
    k = model.cfg.top_k
    bufs = model.ws.moe.rows(part.offset, part.num_tokens, k)
    counts = moe_forward(x, w.moe, k, bufs, y, f"L{w.index}.moe.{part.label}.", stream, sm_target)
    if model.routing is not None and part.num_tokens:
        chosen = bufs.experts if ops.is_cpu(x) else bufs.experts.get(stream=stream)
        rec = model.routing.setdefault(w.index, np.full((model.max_tokens, k), -1, np.int64))
        rec[part.rows] = chosen
    return counts
