"""The mixture-of-experts block (Mixtral): the MLP block of an MoE model, CPU path (NumPy) only so far.

Same contract as tw/layers.mlp_block: x [n, H] (normed input) -> y [n, H], this rank's partial sum,
written into the transport's staging rows; the schedule's fused all-reduce + add + RMSNorm then runs
unchanged. Every expert is TP-sharded like the dense MLP (gate_up by rows: [2 F/tp, H]; down by
columns: [H, F/tp]), so the partial outputs of the ranks add up to the block's output, and the router
is replicated (every rank routes every token the same way: same x, same weights, same float32 GEMM).

Steps, each rounding to the storage dtype where the dense path rounds (float32 on the CPU):
1. router GEMM: logits [n, E] = x @ w_router^T;
2. top-k by logit (highest first, the lower expert index on ties), softmax over the k selected logits
   (the renormalised weights: equal to Mixtral's softmax over all E followed by top-k and renormalising);
3. permutation: the n*k (token, slot) pairs sorted by expert, stably (token order within an expert);
4. per expert e, on its contiguous rows: gate_up GEMM, SiLU * mul, down GEMM (a loop over experts
   with ops.linear; the GPU would use a grouped GEMM);
5. un-permute: y[t] = sum_j weight[t, j] * out[row of (t, j)].

Routing is per token, so TokenWeave's halves (or any split) route each token as the whole batch does.

y=None (FineGrained's chunked down GEMM, tw/schedules.py) stops before the down GEMM and leaves in
model.ws.act[rows] the expert activations scattered densely: act [n, E * F/tp] holds weight[t, j] *
act_e(t) in expert e's column block for the token's selected experts and zeros elsewhere, so that
act @ wdown^T, with wdown [H, E * F/tp] the experts' down shards side by side (LayerWeights.wdown),
is the block's output. E/k times the down GEMM's flops, fine for the CPU check; the real chunked MoE
schedule (per-chunk un-permute) is GPU work for later.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import ops
from .arrays import xp_of
from .trace import span


@dataclass
class MoEWeights:
    router: object    # [E, H]            replicated
    gate_up: object   # [E, 2 F/tp, H]    each expert column-parallel (gate rows, then up rows)
    # The down shards live in LayerWeights.wdown, [H, E * F/tp]: expert e's [H, F/tp] is column block e.


def down_side_by_side(experts_down):
    """[E, H, F/tp] -> [H, E F/tp] (contiguous): expert e's down shard is column block e (LayerWeights.wdown)."""
    xp = xp_of(experts_down)
    num_experts, h, f = experts_down.shape
    return xp.ascontiguousarray(experts_down.transpose(1, 0, 2)).reshape(h, num_experts * f)


def route(logits, top_k: int):
    """(experts [n, k] int64, weights [n, k] in logits' dtype): the k largest logits of each row, highest
    first (argmax: the lower index on ties), and the softmax over those k logits."""
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


def moe_forward(x, moe: MoEWeights, wdown, top_k: int, bufs: dict, y=None, act=None, name: str = "",
                stream=None):
    """The block on x [n, H] (NumPy). bufs: logits [n, E], xs [n k, H], gate_up [n k, 2 F/tp],
    act [n k, F/tp], out [n k, H] (workspace rows). y [n, H]: the partial output; or y=None and
    act [n, E F/tp]: the weighted dense activations (see the module doc). Returns (experts, weights)."""
    if not ops.is_cpu(x):
        raise NotImplementedError("MoE runs on the CPU path only so far; the GPU kernels (router, permutation, "
                                  "grouped GEMM) are not written yet")
    n, k = x.shape[0], top_k
    num_experts = moe.router.shape[0]
    f = moe.gate_up.shape[1] // 2
    logits = bufs["logits"]
    with span(name + "router", stream):
        ops.linear(x, moe.router, logits, stream)
        experts, weights = route(logits, k)
    with span(name + "permute", stream):
        order, offsets, inverse = permute(experts, num_experts)
        xs = bufs["xs"]
        np.take(x, order // k, axis=0, out=xs)
    gate_up, a, out = bufs["gate_up"], bufs["act"], bufs["out"]
    for e in range(num_experts):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        if lo == hi:
            continue
        with span(f"{name}expert{e}", stream):
            ops.linear(xs[lo:hi], moe.gate_up[e], gate_up[lo:hi], stream)
            ops.silu_mul(gate_up[lo:hi], a[lo:hi], stream)
            if y is not None:
                ops.linear(a[lo:hi], wdown[:, e * f:(e + 1) * f], out[lo:hi], stream)
    with span(name + "unpermute", stream):
        inv = inverse.reshape(n, k)
        if y is not None:
            acc = weights[:, 0, None] * out[inv[:, 0]]
            for j in range(1, k):
                acc += weights[:, j, None] * out[inv[:, j]]
            y[...] = acc
        else:
            dense = act.reshape(n, num_experts, f)
            dense[...] = 0
            dense[np.repeat(np.arange(n), k), experts.reshape(-1)] = weights.reshape(-1, 1) * a[inverse]
    return experts, weights


def moe_block(model, w, x, part, y, stream=None):
    """tw/layers.mlp_block for an MoE layer: workspace rows of `part` (its k-times-as-many permuted rows
    are [k offset, k (offset + n)), so TokenWeave's halves stay disjoint)."""
    ws, k = model.ws, model.cfg.top_k
    prow = slice(k * part.offset, k * (part.offset + part.num_tokens))
    bufs = {"logits": ws.moe_logits[part.rows], "xs": ws.moe_x[prow], "gate_up": ws.moe_gate_up[prow],
            "act": ws.moe_act[prow], "out": ws.moe_out[prow]}
    return moe_forward(x, w.moe, w.wdown, k, bufs, y, None if y is not None else ws.act[part.rows],
                       f"L{w.index}.moe.{part.label}.", stream)

