"""The two blocks of a decoder layer, up to the row-parallel GEMM whose output needs an all-reduce.

Column-parallel GEMMs (QKV, gate_up) need no communication; the row-parallel ones (o_proj, down) write
partial sums straight into the transport's staging buffer `y`, and the schedule (tw/schedule/strategies.py) then
calls the fused all-reduce + residual add + RMSNorm on it. That is where nano-vllm's
RowParallelLinear would all-reduce; here it is fused with the next norm, so it lives in the schedule.

Both blocks work on the token rows [part.offset, part.offset + part.num_tokens) of the workspace, so
TokenWeave's halves A and B use disjoint rows of the same buffers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tw import ops
from tw.ops.attention import attention_cuda, attention_numpy
from tw.measure.trace import span


@dataclass
class LayerWeights:
    input_norm: object   # [H]
    post_norm: object    # [H]
    wqkv: object         # [qkv_dim, H]       column-parallel
    bqkv: object         # [qkv_dim] or None
    wo: object           # [H, q_dim]         row-parallel
    wgate_up: object     # [2 F/tp, H]        column-parallel (None in an MoE layer: see moe)
    wdown: object        # [H, F/tp]          row-parallel (None in an MoE layer)
    k_cache: object      # [kv_capacity, kv_heads/tp, head_dim]
    v_cache: object      # [kv_capacity, kv_heads/tp, head_dim]
    index: int = 0       # layer number (trace names)
    moe: object = None   # tw.moe.MoEWeights (router, experts' gate_up and down) when cfg.num_experts > 0


@dataclass
class Part:
    """A (sub)batch's tokens as the kernels need them (arrays on the model's device)."""
    offset: int          # first row in the workspace
    num_tokens: int
    ids: object          # [T] int32
    pos: object          # [T] int32
    slot: object         # [T] int32
    cu_seqlens: object   # host [S + 1] int32 (CPU attention)
    kv_start: object     # host [S] int32
    prefix: object       # host [S] int32
    attn_meta: object    # GPU attention metadata, or None on CPU
    label: str = "all"   # "A" / "B" for TokenWeave's halves (trace names)

    @property
    def rows(self) -> slice:
        return slice(self.offset, self.offset + self.num_tokens)


def attention_block(model, w: LayerWeights, x, part: Part, y, stream=None, sm_target: int | None = None):
    """x [n, H] (normed input) -> y [n, H] partial o_proj output of this rank's heads.
    y=None stops before o_proj (the attention output stays in model.ws.attn[part.rows]).
    sm_target: the SM-count target of the block's GEMMs (tw.ops.linear; None: every SM)."""
    s, n = model.shard, part.num_tokens
    name = f"L{w.index}.attn.{part.label}."
    qkv = model.ws.qkv[part.rows]                                   # [n, qkv_dim]
    with span(name + "qkv_gemm", stream):
        ops.linear(x, w.wqkv, qkv, stream, sm_target)
    with span(name + "rope", stream):
        ops.rope_store_kv(qkv, w.bqkv, part.pos, part.slot, model.inv_freq, w.k_cache, w.v_cache,
                          s.num_heads, s.num_kv_heads, stream)
    q = qkv[:, :s.q_dim].reshape(n, s.num_heads, model.cfg.head_dim)  # strided view into qkv
    attn = model.ws.attn[part.rows]                                 # [n, q_dim]
    out = attn.reshape(n, s.num_heads, model.cfg.head_dim)
    with span(name + "attention", stream):
        if ops.is_cpu(x):
            attention_numpy(q, w.k_cache, w.v_cache, part.cu_seqlens, part.kv_start, part.prefix, model.scale,
                            out=out)
        else:
            attention_cuda(q, w.k_cache, w.v_cache, part.attn_meta, out, model.scale, stream)
    if y is not None:
        with span(name + "o_proj", stream):
            ops.linear(attn, w.wo, y, stream, sm_target)


def mlp_block(model, w: LayerWeights, x, part: Part, y, stream=None, sm_target: int | None = None):
    """x [n, H] (normed input) -> y [n, H] partial down_proj output of this rank's FFN slice.
    y=None stops before down_proj (the activation stays in model.ws.act[part.rows]).
    MoE models (cfg.num_experts > 0) run the MoE block instead (tw/model/moe.py), y required.
    sm_target: as in attention_block."""
    if model.cfg.num_experts:
        if y is None:
            raise ValueError("the MoE block has no split before its down GEMMs (they are per expert): pass y")
        from tw.model.moe import moe_block
        moe_block(model, w, x, part, y, stream, sm_target)
        return
    name = f"L{w.index}.mlp.{part.label}."
    gate_up = model.ws.gate_up[part.rows]                           # [n, 2 F/tp]
    act = model.ws.act[part.rows]                                   # [n, F/tp]
    with span(name + "gate_up", stream):
        ops.linear(x, w.wgate_up, gate_up, stream, sm_target)
    with span(name + "act", stream):
        ops.silu_mul(gate_up, act, stream)
    if y is not None:
        with span(name + "down", stream):
            ops.linear(act, w.wdown, y, stream, sm_target)


def layer_gemms(model, num_tokens: int, stream=None):
    """(launch, flops): layer 0's GEMMs alone on rows [0, num_tokens) of the workspace, for GEMM
    profiles and rates: QKV, o_proj and the MLP's (mlp_gemms). Overwrites workspace rows (run it
    outside a forward pass). launch(sm_target=None): the GEMMs' SM-count target (tw.ops.linear)."""
    w, ws, r, s = model.layers[0], model.ws, slice(0, num_tokens), model.shard
    mlp, mlp_flops = mlp_gemms(model, num_tokens, stream)

    def launch(sm_target=None):
        ops.linear(ws.x[r], w.wqkv, ws.qkv[r], stream, sm_target)
        ops.linear(ws.attn[r], w.wo, ws.residual[r], stream, sm_target)
        mlp(sm_target)

    return launch, 2 * num_tokens * model.cfg.hidden * (s.qkv_dim + s.q_dim) + mlp_flops


def mlp_gemms(model, num_tokens: int, stream=None):
    """(launch, flops) of layer 0's MLP GEMMs at num_tokens rows: gate_up and down; in an MoE layer
    every expert's, at the balanced row counts of num_tokens tokens (tw/moe.balanced_rows: the routed
    counts are not known before routing, and the seeded router spreads tokens evenly).
    launch(sm_target=None) as in layer_gemms."""
    w, ws, r, h = model.layers[0], model.ws, slice(0, num_tokens), model.cfg.hidden
    if model.cfg.num_experts:
        from tw.model.moe import balanced_rows
        rows = balanced_rows(num_tokens, model.cfg.num_experts, model.cfg.top_k)
        b, lo = ws.moe, np.concatenate([[0], np.cumsum(rows)]).astype(int)

        def launch(sm_target=None):
            for e, m in enumerate(rows):
                if m:
                    ops.linear(b.xs[lo[e]:lo[e + 1]], w.moe.gate_up[e], b.gate_up[lo[e]:lo[e + 1]], stream, sm_target)
                    ops.linear(b.act[lo[e]:lo[e + 1]], w.moe.down[e], b.out[lo[e]:lo[e + 1]], stream, sm_target)

        return launch, 2 * int(sum(rows)) * h * 3 * model.shard.ffn

    def launch(sm_target=None):
        ops.linear(ws.x[r], w.wgate_up, ws.gate_up[r], stream, sm_target)
        ops.linear(ws.act[r], w.wdown, ws.residual[r], stream, sm_target)

    return launch, 2 * num_tokens * h * 3 * model.shard.ffn
