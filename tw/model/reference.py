"""Single-process float64 reference of the whole model, written in plain array code (NumPy or CuPy).

It regenerates the full, unsharded weights from the same seed as tw/model/model.py, rounds them to the
model's storage dtype (so both compute with the same numbers), and does every operation in float64:
no sharding, no fusion, no communication. Obviously correct by construction; slow.

Tolerances (relative Frobenius norm ||out - ref|| / ||ref|| of the final hidden states):
- float32 (CPU model): every op rounds to float32 (unit roundoff 6e-8); a few layers of tiny models
  accumulate ~1e-6, so 1e-5 leaves a 10x margin and still catches any wrong index or missing term,
  which give errors of order 1.
- bfloat16 (GPU model): every stored activation is rounded to bf16 (unit roundoff 2^-8 = 3.9e-3,
  RMS relative error of a rounded value ~1.1e-3); a layer stores about 8 of them in series (qkv, rope,
  attention, o_proj, residual, norm, gate_up, act, down), so after a few layers the output carries
  ~1e-2 (errors add up in quadrature and RMSNorm keeps re-scaling). 3e-2 is ~2x that estimate for up to
  8 layers; a real bug (a dropped rank's partial sum, a wrong head, a stale row) gives errors > 0.3.
"""
from __future__ import annotations

import numpy as np

from tw.model import weights
from tw.runtime.arrays import to_host, xp_of as _xp
from tw.model.batch import Batch

TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2}

# MoE routing: the reference routes from its float64 logits, the model from its own (float32 on the
# CPU, ~1e-6 off). They pick the same experts unless a token's k-th and (k+1)-th logits lie within that
# rounding, so forward() refuses (RouterNearTie) a token whose gap is below this: 100x the float32
# logits' error. bfloat16 (the GPU model): ~5x the logits' error after a few layers (their inputs carry
# bf16 rounding; the logits themselves are float32). A GPU check passes the model's routing (forward's
# `routing`): near-ties follow it, every other token must agree (RoutingMismatch).
ROUTER_MIN_GAP = {"float32": 1e-4, "bfloat16": 5e-2}


class RouterNearTie(AssertionError):
    """A token's top-k routing is within rounding of another choice: the comparison would be a coin toss."""


def tolerance(dtype) -> float:
    return TOLERANCE[np.dtype(dtype).name]


def rel_err(out, ref) -> dict:
    """||out - ref|| / ||ref|| and the max / mean absolute error, as floats (inputs NumPy or CuPy)."""
    xp = _xp(ref)
    o, r = out.astype(xp.float64), ref.astype(xp.float64)
    d = o - r
    if not bool(xp.isfinite(o).all()):
        return {"rel_err": float("inf"), "max_abs_err": float("inf"), "mean_abs_err": float("inf")}
    return {"rel_err": float(xp.linalg.norm(d) / xp.linalg.norm(r)), "max_abs_err": float(abs(d).max()),
            "mean_abs_err": float(abs(d).mean())}


def _rmsnorm(h, w, eps):
    return h / _xp(h).sqrt((h * h).mean(axis=-1, keepdims=True) + eps) * w


def _rope(x, pos, inv_freq):
    """x [T, heads, d] float64, rotate-half layout."""
    xp = _xp(x)
    half = x.shape[-1] // 2
    angle = pos[:, None].astype(xp.float64) * inv_freq[None, :]
    cos, sin = xp.cos(angle)[:, None, :], xp.sin(angle)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(q, k_cache, v_cache, batch: Batch, scale: float):
    """Causal attention over each sequence's cache region. q [T, H, d]; caches [slots, Hkv, d]."""
    xp = _xp(q)
    num_heads, num_kv = q.shape[1], k_cache.shape[1]
    group = num_heads // num_kv
    out = xp.zeros_like(q)
    for s, seq in enumerate(batch.seqs):
        lo, hi = int(batch.cu_seqlens[s]), int(batch.cu_seqlens[s + 1])
        n_kv = seq.prefix + seq.new
        k = xp.repeat(k_cache[seq.kv_start:seq.kv_start + n_kv], group, axis=1)   # [n_kv, H, d]
        v = xp.repeat(v_cache[seq.kv_start:seq.kv_start + n_kv], group, axis=1)
        scores = xp.einsum("qhd,khd->hqk", q[lo:hi], k) * scale                     # [H, new, n_kv]
        qpos = seq.prefix + xp.arange(seq.new)
        scores = xp.where(xp.arange(n_kv)[None, None, :] <= qpos[None, :, None], scores, -xp.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        p = xp.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        out[lo:hi] = xp.einsum("hqk,khd->qhd", p, v)
    return out


def forward(cfg, batch: Batch, ids, seed: int, xp, dtype, routing: dict | None = None):
    """Final normed hidden states [T, H] in float64 for token ids `ids` (host int array).

    routing (MoE): the model's chosen experts per layer ({layer: host [T, k]}, tw/moe.moe_block's
    record). Where given, a token whose own top-k is a near-tie (router gap < ROUTER_MIN_GAP) follows
    the model's choice, and every other token must have chosen as the reference does (RoutingMismatch).
    Without it, a near-tie anywhere is refused (RouterNearTie)."""
    f64 = xp.float64

    def stored(a):  # the value the model holds in `dtype`
        return a.astype(dtype).astype(f64)

    hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    inv_freq = xp.asarray(cfg.inv_freq())
    pos = xp.asarray(batch.pos)
    slot = xp.asarray(batch.slot)
    h = stored(weights.embedding(cfg, seed, xp)[xp.asarray(ids)])                   # [T, H]
    capacity = batch.kv_capacity
    x = None
    for layer in range(cfg.num_layers):
        w = weights.full_layer(cfg, layer, seed, xp)
        if x is None:
            x = _rmsnorm(h, stored(w["input_norm"]), cfg.eps)
        k_cache, v_cache = (stored(t) for t in weights.prefix_kv(cfg, layer, capacity, seed, xp))
        qkv = x @ stored(w["wqkv"]).T
        if "bqkv" in w:
            qkv = qkv + stored(w["bqkv"])
        qkv = qkv.reshape(len(pos), nh + 2 * nkv, hd)
        q = _rope(qkv[:, :nh], pos, inv_freq)
        k_cache[slot] = _rope(qkv[:, nh:nh + nkv], pos, inv_freq)
        v_cache[slot] = qkv[:, nh + nkv:]
        attn = attention(q, k_cache, v_cache, batch, hd ** -0.5).reshape(len(pos), nh * hd)
        h = h + attn @ stored(w["wo"]).T
        x = _rmsnorm(h, stored(w["post_norm"]), cfg.eps)
        if cfg.num_experts:
            h = h + _moe(cfg, x, w, stored, layer, np.dtype(dtype).name, None if routing is None else routing[layer][:len(pos)])
        else:
            gate_up = x @ stored(w["wgate_up"]).T
            g, u = gate_up[:, :cfg.ffn], gate_up[:, cfg.ffn:]
            h = h + (g / (1 + xp.exp(-g)) * u) @ stored(w["wdown"]).T
        nxt = (weights.input_norm(cfg, layer + 1, seed, xp) if layer + 1 < cfg.num_layers
               else weights.final_norm(cfg, seed, xp))
        x = _rmsnorm(h, stored(nxt), cfg.eps)
        del w
    return x


def moe(x, router, gate_up, down, top_k: int, forced=None):
    """The MoE block in float64 from float64 weights: router [E, H], gate_up [E, 2F, H], down [E, H, F];
    returns (out [n, H], logits [n, E], top [n, k]). Plain: top-k by a stable sort of the logits (the
    lower index on ties), softmax over the selected, every expert on the tokens that chose it.
    forced [n, k] (ints in x's array module, or None): these experts instead of the own top-k (_moe)."""
    xp = _xp(x)
    num_experts, f = router.shape[0], down.shape[2]
    logits = x @ router.T
    top = _top_k(logits, top_k) if forced is None else xp.asarray(forced, dtype=xp.int64)
    chosen = xp.take_along_axis(logits, top, axis=1)
    p = xp.exp(chosen - chosen.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    out = xp.zeros_like(x)
    for e in range(num_experts):
        tok, slot = xp.nonzero(top == e)       # a token picks an expert at most once
        if len(tok) == 0:
            continue
        h = x[tok] @ gate_up[e].T
        g, u = h[:, :f], h[:, f:]
        out[tok] += p[tok, slot, None] * ((g / (1 + xp.exp(-g)) * u) @ down[e].T)
    return out, logits, top


def _top_k(logits, top_k: int):
    """[n, k] the k largest logits' experts, highest first (a stable sort: the lower index on ties)."""
    xp = _xp(logits)
    return xp.argsort(-logits, axis=1, **({"kind": "stable"} if xp is np else {}))[:, :top_k]


class RoutingMismatch(AssertionError):
    """The model routed a token differently from the reference where rounding cannot explain it."""


def _moe(cfg, x, w, stored, layer: int, dtype_name: str, model_routing=None):
    """moe() on the stored weights of `layer`. Without the model's routing: refuses near-ties
    (RouterNearTie). With it ([T, k] host ints): near-tie tokens follow the model, the others must
    match the reference's own choice as sets (RoutingMismatch), so the block is checked everywhere."""
    from tw.model.moe import router_gap
    router = stored(w["router"])
    logits = x @ router.T          # the routing is decided first, so the experts run once
    gap = router_gap(logits, cfg.top_k)
    min_gap = ROUTER_MIN_GAP.get(dtype_name, 0.0)
    forced = None
    if model_routing is None:
        t = int(gap.argmin())
        if float(gap[t]) < min_gap:
            raise RouterNearTie(f"{cfg.name} layer {layer}, token {t}: its top-{cfg.top_k} and next router logits "
                                f"differ by {float(gap[t]):.2e} < {min_gap:g}, within what {dtype_name} rounding can "
                                "flip: the model and the reference could route it to different experts. Use "
                                "another seed or batch for this check.")
    else:
        own, model_routing = to_host(_top_k(logits, cfg.top_k)), np.asarray(model_routing)
        mine, theirs = np.sort(own, axis=1), np.sort(model_routing, axis=1)
        near = to_host(gap) < min_gap
        wrong = np.nonzero((mine != theirs).any(axis=1) & ~near)[0]
        if len(wrong):
            t = int(wrong[0])
            raise RoutingMismatch(f"{cfg.name} layer {layer}: {len(wrong)} token(s) routed differently from the "
                                  f"float64 reference although their router gap is >= {min_gap:g} (token {t}: model "
                                  f"{theirs[t].tolist()}, reference {mine[t].tolist()}, gap {float(gap[t]):.2e})")
        forced = np.where(near[:, None], model_routing, own)
    return moe(x, router, stored(w["experts_gate_up"]), stored(w["experts_down"]), cfg.top_k, forced)[0]


def forward_once(world, cfg, batch: Batch, ids, seed: int, xp, dtype, routing: dict | None = None):
    """forward() computed once, on world rank 0, and broadcast: [T, H] float64 on every rank, in xp.
    (Every rank computing its own copy cost the CPU path ~40 s per rank-count at 5K tokens.)"""
    import numpy
    ref = None
    if world.rank == 0:
        ref = forward(cfg, batch, ids, seed, xp, dtype, routing)
        ref = numpy.ascontiguousarray(to_host(ref))
    else:
        ref = numpy.empty((batch.num_tokens, cfg.hidden), dtype=numpy.float64)
    world.comm.Bcast(ref, root=0)
    return xp.asarray(ref)


def next_logits(cfg, ids, seed: int, xp, dtype, lm_head_weight, routing: dict | None = None):
    """float64 logits [vocab] of the token after `ids` (one sequence, no cache): the last row of
    forward() times the LM-head matrix (float64 of its stored values, [vocab, H]). routing: as forward's."""
    from tw.model.batch import mixed
    x = forward(cfg, mixed([(len(ids), 0)]), ids, seed, xp, dtype, routing)
    return xp.asarray(lm_head_weight).astype(xp.float64, copy=False) @ x[-1]


def generate(cfg, prompt_ids, num_new: int, seed: int, xp, dtype, lm_head_weight, routing: dict | None = None) -> list:
    """Greedy decoding: `num_new` token ids after `prompt_ids`, each the argmax (lowest index on ties)
    of next_logits() over the whole sequence so far, recomputed from scratch every step: O(n^2), no KV
    cache, nothing shared with the serving engine (tw/serve/engine.py) it checks. routing (MoE): {layer:
    [positions, k]} a run's experts per token position, followed at near-ties as in forward()."""
    ids = [int(t) for t in prompt_ids]
    out = []
    for _ in range(num_new):
        follow = None if routing is None else {layer: a[:len(ids)] for layer, a in routing.items()}
        logits = next_logits(cfg, np.asarray(ids, np.int32), seed, xp, dtype, lm_head_weight, follow)
        out.append(int(xp.argmax(logits)))
        ids.append(out[-1])
    return out
