"""One TP rank's share of a decoder-only transformer: weights, KV caches, and activation workspace.

Everything is allocated here, once, for up to `max_tokens` tokens and `kv_capacity` cache slots, so a
forward pass allocates nothing (a requirement for CUDA-graph capture and for honest timing).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tw import ops
from tw.model import weights
from tw.model.batch import Batch, token_ids
from tw.runtime.dist import env_flag
from tw.model.config import ModelConfig, ShardConfig
from tw.model.layers import LayerWeights, Part
from tw.measure.trace import span


@dataclass
class Workspace:
    x: object        # [max_tokens, H]       normed input of the current block
    residual: object  # [max_tokens, H]      the residual stream
    qkv: object      # [max_tokens, qkv_dim]
    attn: object     # [max_tokens, q_dim]
    gate_up: object  # [max_tokens, 2 F/tp]
    act: object      # [max_tokens, F/tp]
    moe: object = None  # MoE models: tw.moe.MoEBuffers (router, routing and permuted rows); None otherwise


class Model:
    def __init__(self, cfg: ModelConfig, world, max_tokens: int, kv_capacity: int | None = None,
                 seed: int = 0, shard_as_tp: int | None = None, emulation=None):
        """shard_as_tp: hold weight shards sized as at this TP degree (a multiple of the real one) while
        communicating over the real TP group: recreates a larger TP's compute/communication ratio on
        fewer GPUs. The output is then not the model's (only tp/shard_as_tp of it is computed).
        emulation: a tw.comm.emulation.Emulation: this one process holds rank emulation.rank's shards of
        TP=emulation.tp and its transports talk to stand-in peers (output not the model's either)."""
        self.cfg, self.world, self.seed = cfg, world, seed
        self.emulation = emulation
        if emulation is not None:
            if world.tp_size != 1 or shard_as_tp is not None:
                raise ValueError("an emulated rank runs alone (TP=1), without --shard-as-tp")
            self.shard = ShardConfig(cfg, emulation.tp, emulation.rank)
        else:
            shard_tp = shard_as_tp or world.tp_size
            if shard_tp % world.tp_size:
                raise ValueError(f"--shard-as-tp {shard_tp} must be a multiple of the TP degree {world.tp_size}")
            self.shard = ShardConfig(cfg, shard_tp, world.tp_rank)
        self.emulated = self.shard.tp != world.tp_size
        if max_tokens < world.tp_size:
            raise ValueError(f"{max_tokens} tokens cannot be shared by {world.tp_size} TP ranks: "
                             f"use at least {world.tp_size} tokens")
        self.max_tokens = max_tokens
        self.kv_capacity = kv_capacity or max_tokens
        if world.is_gpu:
            import cupy as xp
            self.dtype = ops.BF16
        else:
            xp = np
            self.dtype = np.dtype(np.float32)
        self.xp = xp
        s, hd, dt = self.shard, cfg.head_dim, self.dtype
        self.scale = float(hd) ** -0.5
        self.inv_freq = xp.asarray(cfg.inv_freq().astype(np.float32))          # [hd/2]
        self.embedding = weights.embedding(cfg, seed, xp).astype(dt)            # [vocab, H], replicated
        self.final_norm = weights.final_norm(cfg, seed, xp).astype(dt)          # [H]
        self.layers = []
        for layer in range(cfg.num_layers):
            w = weights.shard_layer(weights.full_layer(cfg, layer, seed, xp), s)
            moe = None
            if cfg.num_experts:
                from tw.model.moe import MoEWeights
                moe = MoEWeights(router=w["router"].astype(dt), gate_up=w["experts_gate_up"].astype(dt),
                                 down=w["experts_down"].astype(dt))
                wgate_up, wdown = None, None
            else:
                wgate_up, wdown = w["wgate_up"].astype(dt), w["wdown"].astype(dt)
            self.layers.append(LayerWeights(
                input_norm=w["input_norm"].astype(dt), post_norm=w["post_norm"].astype(dt),
                wqkv=w["wqkv"].astype(dt), bqkv=w["bqkv"].astype(dt) if "bqkv" in w else None,
                wo=w["wo"].astype(dt), wgate_up=wgate_up, wdown=wdown,
                k_cache=xp.zeros((self.kv_capacity, s.num_kv_heads, hd), dt),
                v_cache=xp.zeros((self.kv_capacity, s.num_kv_heads, hd), dt), index=layer, moe=moe))
            del w
        t = max_tokens
        e, k = cfg.num_experts, cfg.top_k
        self.ws = Workspace(x=xp.zeros((t, cfg.hidden), dt), residual=xp.zeros((t, cfg.hidden), dt),
                            qkv=xp.zeros((t, s.qkv_dim), dt), attn=xp.zeros((t, s.q_dim), dt),
                            gate_up=xp.zeros((t if not e else 0, 2 * s.ffn), dt),
                            act=xp.zeros((t if not e else 0, s.ffn), dt))
        if e:
            from tw.model.moe import MoEBuffers
            self.ws.moe = MoEBuffers.allocate(xp, t, cfg.hidden, s.ffn, e, k, dt)
        self._own_x = self.ws.x
        self.routing = None   # MoE: a dict to record the routing of each layer in (tw/moe.moe_block)
        self.sync()

    def bind_x(self, comm) -> None:
        """Point ws.x (the normed input of every block, which each ar_add_norm writes) at the transport's
        registered output when it has one covering the workspace (p2p, ce), else at the model's own array.
        Registered, the owners of a row write its normalized values straight into every rank's next-GEMM
        input; a private x costs the P2P kernel a copy of the (tp-1)/tp gathered rows at the end of every
        call and the CE transport a device-local copy of all of them. Every strategy binds at the start of
        its forward (a CUDA graph keeps the pointers it was captured with); the strategies' transports are
        distinct objects, so one strategy's pass never writes another's x."""
        output = getattr(comm, "output", None)
        # TW_PRIVATE_X=1 (a debug switch): keep the private x, as every run before commit 106afc7 did, to
        # compare with the result files of that time.
        if output is not None and comm.max_tokens >= self.max_tokens and not env_flag("TW_PRIVATE_X"):
            self.ws.x = output(self.max_tokens)
        else:
            self.ws.x = self._own_x

    def sync(self) -> None:
        """Wait for all setup work on the device. Setup runs on CuPy's default stream and forward passes
        on the caller's non-blocking stream, which does not wait for the default one: without this, a
        forward pass could read metadata whose upload is still queued behind other work (seen on the
        lab machine as an illegal address in the attention kernel after the float64 reference ran)."""
        if self.world.is_gpu:
            self.xp.cuda.Device().synchronize()

    def norm_weight_after(self, layer: int):
        """The norm applied to the MLP output of `layer`: the next layer's input norm, or the final norm."""
        return self.layers[layer + 1].input_norm if layer + 1 < len(self.layers) else self.final_norm

    def load_prefix(self, batch: Batch) -> None:
        """Fill the cache slots of every sequence's prefix with the seeded prefix K/V (see weights.py)."""
        if not batch.prefix.any():
            return
        if batch.kv_capacity > self.kv_capacity:
            raise ValueError(f"batch needs {batch.kv_capacity} KV slots, the model has {self.kv_capacity}")
        for layer, w in enumerate(self.layers):
            k, v = weights.prefix_kv(self.cfg, layer, self.kv_capacity, self.seed, self.xp)
            k, v = weights.shard_kv(k, self.shard), weights.shard_kv(v, self.shard)
            for s in batch.seqs:
                rows = slice(s.kv_start, s.kv_start + s.prefix)
                w.k_cache[rows] = k[rows].astype(self.dtype)
                w.v_cache[rows] = v[rows].astype(self.dtype)
        self.sync()

    def part(self, batch: Batch, ids: np.ndarray | None = None, label: str = "all") -> Part:
        """Move a (sub)batch's token metadata to the device. ids: the full batch's token ids."""
        if batch.num_tokens + batch.offset > self.max_tokens:
            raise ValueError(f"batch of {batch.num_tokens} tokens (offset {batch.offset}) exceeds the model's "
                             f"max_tokens={self.max_tokens}")
        if batch.kv_capacity > self.kv_capacity:
            raise ValueError(f"batch needs {batch.kv_capacity} KV slots, the model has {self.kv_capacity}")
        if ids is None:
            ids = token_ids(batch.offset + batch.num_tokens, self.cfg.vocab, self.seed)
        ids = np.asarray(ids[batch.offset:batch.offset + batch.num_tokens], dtype=np.int32)
        if ids.size and (ids.min() < 0 or ids.max() >= self.cfg.vocab):
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab}), got [{ids.min()}, {ids.max()}]")
        xp = self.xp
        meta = None
        if self.world.is_gpu:
            from tw.ops.attention import attention_meta
            meta = attention_meta(batch.cu_seqlens, batch.kv_start, batch.prefix)
        part = Part(offset=batch.offset, num_tokens=batch.num_tokens, ids=xp.asarray(ids),
                    pos=xp.asarray(batch.pos), slot=xp.asarray(batch.slot), cu_seqlens=batch.cu_seqlens,
                    kv_start=batch.kv_start, prefix=batch.prefix, attn_meta=meta, label=label)
        self.sync()
        return part

    def embed(self, part: Part, stream=None):
        """residual[rows] = embedding[ids]; x[rows] = RMSNorm(residual) * layer 0's input norm."""
        r = part.rows
        with span(f"embed.{part.label}", stream):
            ops.embedding(part.ids, self.embedding, self.ws.residual[r], stream)
            ops.add_rmsnorm(None, self.ws.residual[r], self.layers[0].input_norm, self.cfg.eps, self.ws.x[r],
                            stream)


def memory_estimate(cfg: ModelConfig, shard: ShardConfig, max_tokens: int, kv_capacity: int, dtype_bytes: int,
                    transports: int = 1, reference_tokens: int = 0, seq_len: int = 0) -> dict:
    """Bytes one rank will hold, by part, before anything is built (a size check, not an exact count).

    weights: this rank's shards of every layer, the replicated embedding and norms, plus one unsharded
    float32 layer alive while it is sharded (tw/model/weights.py). kv: the KV caches. workspace: the
    activation buffers and `transports` communication buffers (~3 [max_tokens, hidden] arrays each).
    reference: the float64 reference for `reference_tokens` tokens (one full float32 layer, its largest
    matrix in float64 twice, the float32 embedding, float64 activations and KV, and one sequence's
    scores twice: the softmax holds two copies at its peak).
    """
    h, hd, layers = cfg.hidden, cfg.head_dim, cfg.num_layers
    e, k = max(cfg.num_experts, 1), cfg.top_k if cfg.num_experts else 0   # MoE: E experts + router
    router = cfg.num_experts * h
    full_layer = (cfg.num_heads + 2 * cfg.num_kv_heads) * hd * h + h * cfg.num_heads * hd + 3 * e * cfg.ffn * h + router
    shard_layer = shard.qkv_dim * h + h * shard.q_dim + 3 * e * shard.ffn * h + 2 * h + router
    if cfg.num_experts:   # tw/moe.MoEBuffers in place of the dense MLP's gate_up and act
        from tw.model.moe import MoEBuffers
        mlp_ws = MoEBuffers.bytes(max_tokens, h, shard.ffn, cfg.num_experts, k, dtype_bytes)
    else:
        mlp_ws = max_tokens * 3 * shard.ffn * dtype_bytes
    est = {"weights": layers * shard_layer * dtype_bytes + (cfg.vocab * h + h) * dtype_bytes + full_layer * 4,
           "kv": 2 * layers * kv_capacity * shard.num_kv_heads * hd * dtype_bytes,
           "workspace": max_tokens * (2 * h + shard.qkv_dim + shard.q_dim) * dtype_bytes + mlp_ws
           + transports * 3 * max_tokens * h * dtype_bytes}
    if reference_tokens:
        t = reference_tokens
        biggest = 2 * e * cfg.ffn * h   # MoE: all experts' gate_up
        est["reference"] = (full_layer * 4 + 2 * biggest * 8 + cfg.vocab * h * 4
                            + t * (4 * h + (cfg.num_heads + 2 * cfg.num_kv_heads) * hd + 3 * cfg.ffn) * 8
                            + 2 * kv_capacity * cfg.num_kv_heads * hd * 8 + 2 * cfg.num_heads * seq_len ** 2 * 8)
    est["total"] = sum(est.values())
    return est
