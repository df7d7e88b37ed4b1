"""Every operator against an obviously-correct float64 NumPy version: CPU path always, GPU kernels when
a GPU is present (fresh random data, never zeros or ones; outputs poisoned before the call).

Tolerances: relative norm error. CPU float32: 1e-6 (a single op rounds once, u = 6e-8).
GPU bf16: 1e-2 (inputs are bf16-exact in the reference; the output is rounded to bf16, RMS relative
error ~1.1e-3, and the GEMM accumulates in fp32).
"""
import numpy as np
import pytest

from tw import ops
from tw.model import reference
from conftest import requires_gpu

rng = np.random.default_rng(1234)


def relerr(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def rmsnorm64(h, w, eps):
    return h / np.sqrt((h * h).mean(-1, keepdims=True) + eps) * w


def rope64(x, pos, inv_freq):
    return reference._rope(x, pos, inv_freq)


def test_cpu_ops_match_float64():
    t, h = 19, 64
    x, res, w = (rng.standard_normal(s).astype(np.float32) for s in ((t, h), (t, h), (h,)))
    out, r = np.empty_like(x), res.copy()
    ops.add_rmsnorm(x, r, w, 1e-5, out)
    assert relerr(r, res.astype(np.float64) + x) < 1e-6
    assert relerr(out, rmsnorm64(res.astype(np.float64) + x, w, 1e-5)) < 1e-6
    gu = rng.standard_normal((t, 2 * h)).astype(np.float32)
    act = np.empty((t, h), np.float32)
    ops.silu_mul(gu, act)
    g, u = gu[:, :h].astype(np.float64), gu[:, h:]
    assert relerr(act, g / (1 + np.exp(-g)) * u) < 1e-6


def _gpu_inputs(shape, cp):
    return cp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(ops.BF16)


def _f64(a):
    return a.get().astype(np.float64)


@requires_gpu
@pytest.mark.parametrize("t,h", [(1, 8), (7, 5120), (33, 8192), (5, 16384)])
def test_gpu_add_rmsnorm(t, h):
    import cupy as cp
    x, res, w = _gpu_inputs((t, h), cp), _gpu_inputs((t, h), cp), _gpu_inputs((h,), cp)
    want_res = _f64(res) + _f64(x)
    out = cp.full((t, h), np.nan, dtype=ops.BF16)
    ops.add_rmsnorm(x, res, w, 1e-5, out)
    assert relerr(_f64(res), want_res) < 1e-2
    assert relerr(_f64(out), rmsnorm64(want_res, _f64(w), 1e-5)) < 1e-2
    # x=None: norm of the residual alone, residual untouched
    before = _f64(res)
    ops.add_rmsnorm(None, res, w, 1e-5, out)
    assert np.array_equal(_f64(res), before)
    assert relerr(_f64(out), rmsnorm64(before, _f64(w), 1e-5)) < 1e-2


@requires_gpu
@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (100, 1024, 512), (4096, 2048, 1024)])
def test_gpu_linear(m, n, k):
    import cupy as cp
    x, w = _gpu_inputs((m, k), cp), _gpu_inputs((n, k), cp)
    big = cp.full((m + 3, n), np.nan, dtype=ops.BF16)   # output rows inside a larger buffer
    ops.linear(x, w, big[2:2 + m])
    assert relerr(_f64(big[2:2 + m]), _f64(x) @ _f64(w).T) < 1e-2
    assert bool(cp.isnan(big[:2].astype(cp.float32)).all())  # rows outside untouched


@requires_gpu
def test_gpu_silu_mul_embedding_rope():
    import cupy as cp
    t, f = 37, 1000
    gu = _gpu_inputs((t, 2 * f), cp)
    act = cp.full((t, f), np.nan, dtype=ops.BF16)
    ops.silu_mul(gu, act)
    g, u = _f64(gu)[:, :f], _f64(gu)[:, f:]
    assert relerr(_f64(act), g / (1 + np.exp(-g)) * u) < 1e-2

    table = _gpu_inputs((50, 256), cp)
    ids = rng.integers(0, 50, t).astype(np.int32)
    emb = cp.full((t, 256), np.nan, dtype=ops.BF16)
    ops.embedding(cp.asarray(ids), table, emb)
    assert np.array_equal(_f64(emb), _f64(table)[ids])

    nh, nkv, hd = 8, 2, 128
    qkv = _gpu_inputs((t, (nh + 2 * nkv) * hd), cp)
    bias = _gpu_inputs(((nh + 2 * nkv) * hd,), cp)
    before = _f64(qkv) + _f64(bias)
    pos = rng.integers(0, 20000, t).astype(np.int32)
    slot = rng.permutation(64)[:t].astype(np.int32)
    inv_freq = (1.0 / (500000.0 ** (np.arange(0, hd, 2) / hd))).astype(np.float32)
    kc = cp.full((64, nkv, hd), np.nan, dtype=ops.BF16)
    vc = cp.full((64, nkv, hd), np.nan, dtype=ops.BF16)
    ops.rope_store_kv(qkv, bias, cp.asarray(pos), cp.asarray(slot), cp.asarray(inv_freq), kc, vc, nh, nkv)
    x = before.reshape(t, nh + 2 * nkv, hd)
    inv64 = inv_freq.astype(np.float64)
    assert relerr(_f64(qkv)[:, :nh * hd].reshape(t, nh, hd), rope64(x[:, :nh], pos, inv64)) < 1e-2
    assert relerr(_f64(kc)[slot], rope64(x[:, nh:nh + nkv], pos, inv64)) < 1e-2
    assert relerr(_f64(vc)[slot], x[:, nh + nkv:]) < 1e-2


@requires_gpu
def test_gpu_bad_input_is_a_clear_error():
    import cupy as cp
    with pytest.raises(TypeError, match="must be bfloat16"):
        ops.add_rmsnorm(None, cp.zeros((2, 64), cp.float32), cp.zeros(64, cp.float32), 1e-5,
                        cp.zeros((2, 64), cp.float32))
    x = cp.zeros((2, 72), ops.BF16)
    with pytest.raises(ValueError, match="16-byte aligned|C-contiguous"):
        ops.silu_mul(x[:, 4:], cp.zeros((2, 34), ops.BF16))
    with pytest.raises(ValueError, match="do not fit"):
        ops.linear(cp.zeros((4, 64), ops.BF16), cp.zeros((8, 32), ops.BF16), cp.zeros((4, 8), ops.BF16))


@requires_gpu
def test_gpu_hold_keeps_its_stream_busy_for_the_time_asked():
    """bench.hold (cuda/hold.cu): an event pair around it measures at least the time asked, and work
    queued behind it on the stream runs after it (not beside it)."""
    import cupy as cp
    from tw.measure import bench
    stream = cp.cuda.Stream(non_blocking=True)
    start, mid, end = cp.cuda.Event(), cp.cuda.Event(), cp.cuda.Event()
    x = cp.zeros(1 << 20, dtype=cp.float32)
    bench.hold(stream, 1.0)  # the first call compiles and loads the kernel: keep that out of the timing
    stream.synchronize()
    with stream:
        start.record(stream)
        bench.hold(stream, 300.0)
        mid.record(stream)
        x += 1
        end.record(stream)
    end.synchronize()
    assert 0.3 <= cp.cuda.get_elapsed_time(start, mid) < 5.0
    assert cp.cuda.get_elapsed_time(start, end) >= cp.cuda.get_elapsed_time(start, mid)
    assert float(x.sum()) == float(x.size)
