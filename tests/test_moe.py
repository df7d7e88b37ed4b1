"""The MoE block (tw/model/moe.py): routing and permutation against plain per-token loops, the block against a
per-token float64 loop, TP sharding and token splits, every strategy on CPU ranks, and the refusals."""
import json

import numpy as np
import pytest

from conftest import ERR_OUT, requires_gpu, run_mpi, usage_error
from tw.model import config, reference, weights
from tw.model import moe as moe_mod
from tw.runtime.arrays import to_host
from tw.model.moe import MoEBuffers, MoEWeights, moe_forward, permute, route, router_gap


def _logits(n=53, e=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, e), dtype=np.float32)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_route_is_top_k_with_renormalised_softmax(top_k):
    logits = _logits()
    logits[3, 5] = logits[3, 2] = logits[3].max() + 1  # a tie at the top: the lower index first
    experts, w = route(logits, top_k)
    for t, row in enumerate(logits):
        want = sorted(range(len(row)), key=lambda e: (-row[e], e))[:top_k]
        assert experts[t].tolist() == want
        sel = row[want].astype(np.float64)
        p = np.exp(sel - sel.max())
        np.testing.assert_allclose(w[t], p / p.sum(), rtol=1e-6)
    assert w.dtype == np.float32 and np.allclose(w.sum(axis=1), 1, atol=1e-6)
    assert experts[3, :2].tolist() == [2, 5][:top_k]


def test_permutation_groups_by_expert_stably_and_inverts():
    experts, _ = route(_logits(), 2)
    order, offsets, inverse = permute(experts, 8)
    flat = experts.reshape(-1)
    assert sorted(order.tolist()) == list(range(flat.size)) and offsets[-1] == flat.size
    for e in range(8):
        block = order[offsets[e]:offsets[e + 1]]
        assert (flat[block] == e).all() and (np.diff(block) > 0).all()   # this expert's pairs, token order
    assert (order[inverse] == np.arange(flat.size)).all() and (inverse[order] == np.arange(flat.size)).all()


def _block(num_experts=4, hidden=64, ffn=32, seed=0):
    rng = np.random.default_rng(seed)
    router = rng.standard_normal((num_experts, hidden), dtype=np.float32) * hidden ** -0.5
    gate_up = rng.standard_normal((num_experts, 2 * ffn, hidden), dtype=np.float32) * hidden ** -0.5
    down = rng.standard_normal((num_experts, hidden, ffn), dtype=np.float32) * ffn ** -0.5
    return router, gate_up, down


def _run(x, router, gate_up, down, k, xp=np, dtype=np.float32, gemm_mode="loop"):
    """The block on x (NumPy float32, or CuPy bf16 with xp=cupy): (y, experts, weights) as host arrays."""
    n, e, f = x.shape[0], router.shape[0], down.shape[2]
    bufs = MoEBuffers.allocate(xp, n, x.shape[1], f, e, k, dtype)
    cast = lambda a: xp.asarray(a).astype(dtype)
    y = xp.full((n, x.shape[1]), np.nan, dtype)  # every row must be written
    counts = moe_forward(cast(x), MoEWeights(cast(router), cast(gate_up), cast(down)), k, bufs, y,
                         gemm_mode=gemm_mode)
    assert counts.sum() == n * k
    return to_host(y).astype(np.float32), to_host(bufs.experts), to_host(bufs.weights)


def _per_token_loop(x, router, gate_up, down, k):
    """float64, one token at a time: the block as the Mixtral paper writes it."""
    x, router, gate_up, down = (a.astype(np.float64) for a in (x, router, gate_up, down))
    f = down.shape[2]
    out = np.zeros_like(x)
    for t in range(len(x)):
        logits = router @ x[t]
        top = sorted(range(len(logits)), key=lambda e: (-logits[e], e))[:k]
        p = np.exp(logits[top] - logits[top].max())
        for e, wt in zip(top, p / p.sum()):
            h = gate_up[e] @ x[t]
            g, u = h[:f], h[f:]
            out[t] += wt * (down[e] @ (g / (1 + np.exp(-g)) * u))
    return out


@pytest.mark.parametrize("k", [1, 2])
def test_block_matches_per_token_float64_loop(k):
    router, gate_up, down = _block()
    x = np.random.default_rng(5).standard_normal((41, 64), dtype=np.float32)
    y, _, _ = _run(x, router, gate_up, down, k)
    want = _per_token_loop(x, router, gate_up, down, k)
    assert reference.rel_err(y, want)["rel_err"] < 1e-6
    got, _, _ = reference.moe(x.astype(np.float64), *(a.astype(np.float64) for a in (router, gate_up, down)), k)
    assert reference.rel_err(got, want)["rel_err"] < 1e-12   # the model reference's block agrees too


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_shards_of_the_experts_sum_to_the_block(tp):
    cfg = config.get("tiny-moe")
    full = weights.full_layer(cfg, 1, 3, np)
    x = np.random.default_rng(1).standard_normal((30, cfg.hidden), dtype=np.float32)
    whole, e1, w1 = _run(x, full["router"], full["experts_gate_up"], full["experts_down"], cfg.top_k)
    total = np.zeros(whole.shape, np.float64)
    for r in range(tp):
        s = weights.shard_layer(full, config.ShardConfig(cfg, tp, r))
        assert s["experts_gate_up"].shape == (4, 2 * cfg.ffn // tp, cfg.hidden)
        assert s["experts_down"].shape == (4, cfg.hidden, cfg.ffn // tp)
        y, e, w = _run(x, s["router"], s["experts_gate_up"], s["experts_down"], cfg.top_k)
        assert (e == e1).all() and (w == w1).all()   # the replicated router routes alike on every rank
        total += y
    assert reference.rel_err(total, whole)["rel_err"] < 1e-6


def test_splitting_a_batch_keeps_every_tokens_routing_and_output():
    router, gate_up, down = _block(seed=2)
    n = 29
    x = np.random.default_rng(7).standard_normal((n, 64), dtype=np.float32)
    y, experts, w = _run(x, router, gate_up, down, 2)
    for s in range(1, n):
        ya, ea, wa = _run(x[:s], router, gate_up, down, 2)
        yb, eb, wb = _run(x[s:], router, gate_up, down, 2)
        assert (np.concatenate([ea, eb]) == experts).all(), f"split at {s} changed the routing"
        np.testing.assert_allclose(np.concatenate([wa, wb]), w, rtol=1e-6, err_msg=f"split at {s}")
        np.testing.assert_allclose(np.concatenate([ya, yb]), y, rtol=1e-5, atol=1e-6, err_msg=f"split at {s}")


def test_reference_refuses_a_near_tie_of_the_routing():
    cfg = config.get("tiny-moe")
    w = weights.full_layer(cfg, 0, 0, np)
    x = np.random.default_rng(0).standard_normal((5, cfg.hidden))
    w["router"][1:] = w["router"][0]   # every expert's logit the same: the 2nd and 3rd always tie
    gap = router_gap(x @ w["router"].astype(np.float64).T, 2)
    assert (gap < 1e-6).any()
    with pytest.raises(reference.RouterNearTie, match="Use another seed"):
        reference._moe(cfg, x, w, lambda a: a.astype(np.float64), 0, "float32")
    assert router_gap(np.zeros((3, 2)), 2).tolist() == [np.inf] * 3   # k = E: nothing else to pick


def test_moe_shapes_shard_like_the_dense_mlp():
    m = config.get("mixtral-8x22b")
    assert (m.num_experts, m.top_k, m.ffn, m.hidden) == (8, 2, 16384, 6144)
    assert config.ShardConfig(m, 8, 7).ffn == 2048 and config.valid_tp(m) == [1, 2, 4, 8]
    assert config.valid_tp(config.get("tiny-moe")) == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="top_k"):
        config.ModelConfig("bad", 64, 2, 2, 32, 64, 1, 10, 1e4, 1e-5, num_experts=2, top_k=3)


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_strategies_match_reference_on_cpu_ranks(ranks):
    out = _ok(run_mpi(ranks, ["-m", "tests.mpi_model", "--device", "cpu", "--model", "tiny-moe"]))
    assert "ALL PASS" in out and f"TP={ranks} and TP=1 each match the float64 reference" in out
    for strat in ("nccl", "fused", "finegrained2", "tokenweave"):
        assert out.count(f"PASS tiny-moe tp={ranks} {strat}") == 2, out   # both batches


def test_latency_check_on_cpu(tmp_path):
    """Every strategy against the reference that follows its routing, a split tokenweave batch among them."""
    rows = tmp_path / "rows.jsonl"
    out = _ok(run_mpi(2, ["-m", "experiments.latency", "--device", "cpu", "--model", "tiny-moe", "--check",
                          "--tokens", "64", "300", "--min-split-tokens", "256", "--out", str(rows)]))
    assert "NO GPU" in out and "FAIL" not in out and out.count(" ok") >= 6
    rows = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [r["split_at"] for r in rows if r["strategy"] == "tokenweave"] == [None, 150]
    assert all(r["correct"] for r in rows if r["strategy"] != "nocomm")


def test_throughput_check_on_cpu_follows_the_engines_routing():
    out = _ok(run_mpi(2, ["-m", "experiments.throughput", "--device", "cpu", "--model", "tiny-moe", "--check",
                          "--requests", "4", "--check-requests", "2", "--output-len", "4",
                          "--out", "/tmp/tw-test-moe-throughput.jsonl"]))
    assert "FAIL" not in out and out.count("check ok") == 3, out[-3000:]   # nccl, fused, tokenweave


def test_mixtral_is_too_large_for_the_cpu_path():
    from experiments import latency
    assert usage_error(latency.main, ["--device", "cpu", "--model", "mixtral-8x22b", "--out", ERR_OUT]).startswith(
        "--model mixtral-8x22b is too large for the CPU path (no GPU here); use one of")


def test_reference_follows_the_model_only_at_near_ties():
    cfg = config.get("tiny-moe")
    w = weights.full_layer(cfg, 0, 0, np)
    x = np.random.default_rng(0).standard_normal((40, cfg.hidden))
    f64 = lambda a: a.astype(np.float64)
    want, logits, top = reference.moe(x, f64(w["router"]), f64(w["experts_gate_up"]), f64(w["experts_down"]), 2)
    gap = router_gap(logits, 2)
    swapped = top[:, ::-1].copy()                   # the same sets, other order: agrees
    got = reference._moe(cfg, x, w, f64, 0, "float32", swapped)
    assert reference.rel_err(got, want)["rel_err"] < 1e-12
    wrong = top.copy()
    t = int(gap.argmax())                           # the most confident token, routed elsewhere
    wrong[t, 1] = next(e for e in range(cfg.num_experts) if e not in top[t])
    with pytest.raises(reference.RoutingMismatch, match=f"token {t}"):
        reference._moe(cfg, x, w, f64, 0, "float32", wrong)
    # near-ties (every token, with a huge threshold) follow the model's choice
    old = reference.ROUTER_MIN_GAP["float32"]
    reference.ROUTER_MIN_GAP["float32"] = 1e9
    try:
        forced = reference._moe(cfg, x, w, f64, 0, "float32", wrong)
    finally:
        reference.ROUTER_MIN_GAP["float32"] = old
    want_forced, _, _ = reference.moe(x, f64(w["router"]), f64(w["experts_gate_up"]), f64(w["experts_down"]), 2,
                                      forced=wrong)
    assert np.array_equal(forced, want_forced) and not np.allclose(forced[t], want[t])


def test_gemm_mode_is_checked():
    router, gate_up, down = _block(num_experts=4, hidden=16, ffn=8, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 16), dtype=np.float32)
    with pytest.raises(ValueError, match="choose one of"):
        _run(x, router, gate_up, down, 2, gemm_mode="fast")


def test_the_moe_block_needs_its_output_rows():
    from tw.model.layers import mlp_block

    class M:
        cfg = config.get("tiny-moe")
    with pytest.raises(ValueError, match="pass y"):
        mlp_block(M(), None, None, None, None)


@requires_gpu
@pytest.mark.parametrize("mode", moe_mod.GEMM_MODES)
@pytest.mark.parametrize("n,k", [(1, 2), (37, 2), (700, 2), (300, 1), (129, 3)])
def test_gpu_block_matches_the_cpu_block_and_float64(n, k, mode):
    import cupy as cp
    from tw import ops
    router, gate_up, down = _block(num_experts=8, hidden=128, ffn=64, seed=n)
    x = np.random.default_rng(n).standard_normal((n, 128), dtype=np.float32)
    bf = lambda a: a.astype(ops.BF16).astype(np.float32)   # what the GPU holds
    xb, rb, gb, db = (bf(a) for a in (x, router, gate_up, down))
    y, experts, w = _run(xb, rb, gb, db, k, xp=cp, dtype=ops.BF16, gemm_mode=mode)
    y_cpu, e_cpu, w_cpu = _run(xb, rb, gb, db, k)
    logits = xb.astype(np.float64) @ rb.astype(np.float64).T
    sure = router_gap(logits, k) > 1e-4   # float32 logits on both: only true near-ties may differ
    assert (np.sort(experts, 1) == np.sort(e_cpu, 1))[sure].all()
    np.testing.assert_allclose(w[sure], w_cpu[sure], rtol=1e-4, atol=1e-6)
    want, _, _ = reference.moe(*(a.astype(np.float64) for a in (xb, rb, gb, db)), k, forced=experts)
    assert reference.rel_err(y, want)["rel_err"] < 2e-2   # bf16 activations and outputs


@requires_gpu
def test_gpu_permutation_is_the_cpu_permutation():
    import cupy as cp
    from tw.ops import moe as moe_ops
    for n, e, k in [(1, 8, 2), (5000, 8, 2), (3000, 64, 8), (1025, 3, 1)]:
        experts = np.random.default_rng(n).integers(0, e, (n, k))
        if k > 1:   # distinct experts per token, as routing gives
            experts = np.stack([np.random.default_rng(n + t).permutation(e)[:k] for t in range(n)])
        order, offsets, inverse = permute(experts, e)
        d = cp.asarray(experts, cp.int32)
        off, inv, src = cp.zeros(e + 1, cp.int32), cp.zeros(n * k, cp.int32), cp.zeros(n * k, cp.int32)
        moe_ops.permute(d, e, off, inv, src)
        assert (off.get() == offsets).all() and (inv.get() == inverse).all() and (src.get() == order // k).all()


@requires_gpu
def test_gpu_moe_model_check_at_tp1():
    out = _ok(run_mpi(1, ["-m", "experiments.latency", "--device", "gpu", "--model", "tiny-moe", "--tokens", "256",
                          "1500", "--check", "--out", "/tmp/tw-test-moe-gpu.jsonl"], timeout=600))
    assert "FAIL" not in out and out.count(" ok") >= 6, out[-3000:]


@requires_gpu
def test_gpu_moe_refuses_graph_capture_plainly():
    import cupy as cp
    from tw.ops import moe as moe_ops
    offsets, host = cp.zeros(9, cp.int32), np.zeros(9, np.int32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
                moe_ops.start_offsets_copy(offsets, host, stream)
        finally:
            stream.end_capture()


@requires_gpu
def test_gpu_latency_refuses_an_explicit_graph_for_moe():
    r = run_mpi(1, ["-m", "experiments.latency", "--device", "gpu", "--model", "tiny-moe", "--tokens", "256",
                    "--graph", "--out", "/tmp/tw-test-moe-graph.jsonl"], timeout=300)
    assert r.returncode != 0 and "use --no-graph" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
