"""Causal prefill attention: tw's kernel (cuda/attention.cu) against torch SDPA on the same GPU.

    python -m experiments.attention [--tokens 4096 8192 16384] [--seqs 1 4] [--out FILE]

For each (sequences, total tokens, heads) case, equal-length sequences with no prefix, head_dim 128:
    FLOPs  = 4 * head_dim * num_heads * sum_s n_s (n_s + 1) / 2      (QK^T and PV over causal pairs)
    tflops = FLOPs / median time
Both implementations run on the same stream (torch's current stream, wrapped for CuPy) and are timed
the same way: tw.measure.bench.time_gpu, CUDA events around each call, median of --iters after --warmup.
Every tw row carries its correctness column: relative norm error against torch's output.
torch is optional: without it the torch rows are skipped (with a message) and ratio_vs_torch is empty.
"""
from __future__ import annotations

import numpy as np

from experiments import common
from tw.measure import bench
from tw.runtime import dist
from tw.runtime.arrays import bf16_from_f32, f32_from_bf16
from tw.ops.attention import BF16, attention_cuda, attention_meta

HEADS = ((32, 4), (64, 8))  # Llama-70B / Qwen-72B at TP=2, and unsharded
HEAD_DIM = 128
VARIANTS = {"wgmma": ("wgmma", 128), "mma128": ("mma", 128), "mma64": ("mma", 64)}  # name -> (kernel, block_m)


def causal_flops(seqlens, num_heads, head_dim) -> float:
    pairs = sum(n * (n + 1) // 2 for n in seqlens)
    return 4.0 * head_dim * num_heads * pairs


def torch_impls(torch):
    """name -> context manager factory for the SDPA backends to time ('torch' = torch's own choice)."""
    import contextlib
    impls = {"torch": contextlib.nullcontext}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        impls["torch_flash"] = lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])
        impls["torch_cudnn"] = lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
    except ImportError:
        pass
    return impls


def run_case(num_seqs, num_tokens, num_heads, num_kv_heads, args, stream, torch, writer, table):
    import cupy as cp
    n = num_tokens // num_seqs
    seqlens = [n] * num_seqs
    num_tokens = n * num_seqs
    flops = causal_flops(seqlens, num_heads, HEAD_DIM)
    scale = 1.0 / np.sqrt(HEAD_DIM)
    rng = cp.random.default_rng(0)
    with stream:
        qkv = bf16_from_f32(rng.standard_normal((num_tokens, (num_heads + 2 * num_kv_heads) * HEAD_DIM),
                                          dtype=cp.float32))  # [T, (H + 2 Hkv) * D]
        q = qkv[:, :num_heads * HEAD_DIM].reshape(num_tokens, num_heads, HEAD_DIM)
        k = qkv[:, num_heads * HEAD_DIM:(num_heads + num_kv_heads) * HEAD_DIM]
        v = qkv[:, (num_heads + num_kv_heads) * HEAD_DIM:]
        k_cache = cp.ascontiguousarray(k).reshape(num_tokens, num_kv_heads, HEAD_DIM)
        v_cache = cp.ascontiguousarray(v).reshape(num_tokens, num_kv_heads, HEAD_DIM)
        out = cp.empty((num_tokens, num_heads, HEAD_DIM), dtype=BF16)
    cu = np.arange(num_seqs + 1, dtype=np.int32) * n
    kv_start, prefix = cu[:-1].copy(), np.zeros(num_seqs, np.int32)
    case = dict(seqs=num_seqs, tokens=num_tokens, num_heads=num_heads, num_kv_heads=num_kv_heads,
                head_dim=HEAD_DIM, gflop=flops / 1e9)

    rows = []
    ref = None
    if torch is not None:
        # torch's native layout for flash attention: [B, N, H, D] memory viewed as [B, H, N, D].
        def as_torch(x, heads):
            t = torch.as_tensor(cp.ascontiguousarray(x).view(cp.int16), device="cuda").view(torch.bfloat16)
            return t.reshape(num_seqs, n, heads, HEAD_DIM).transpose(1, 2)
        stream.synchronize()
        tq, tk, tv = as_torch(q, num_heads), as_torch(k_cache, num_kv_heads), as_torch(v_cache, num_kv_heads)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        for name, ctx in torch_impls(torch).items():
            def fn(ctx=ctx):
                with ctx():
                    return sdpa(tq, tk, tv, is_causal=True, scale=scale, enable_gqa=True)
            try:
                t_out = fn()
                torch.cuda.synchronize()
            except Exception as e:  # a backend that does not take this shape or GQA
                print(f"  {name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
                continue
            if name == "torch":
                ref = cp.asarray(t_out.transpose(1, 2).reshape(num_tokens, num_heads, HEAD_DIM).float())
            times = bench.time_gpu(fn, iters=args.iters, warmup=args.warmup, stream=stream)
            rows.append(dict(impl=name, **case, time_ms=float(np.median(times)), min_ms=float(times.min()),
                             rel_err_vs_torch=None))
    for variant in args.variants:
        kernel, block_m = VARIANTS[variant]
        meta = attention_meta(cu, kv_start, prefix, block_m=block_m, kernel=kernel)

        def fn(meta=meta):
            attention_cuda(q, k_cache, v_cache, meta, out, scale, stream=stream)
        out.view(cp.uint16).fill(0x7FC0)  # NaN: unwritten outputs would show in the error column
        fn()
        stream.synchronize()
        err = None
        if ref is not None:
            got = f32_from_bf16(out)
            err = float(cp.linalg.norm(got - ref) / cp.linalg.norm(ref))
        times = bench.time_gpu(fn, iters=args.iters, warmup=args.warmup, stream=stream)
        rows.append(dict(impl=f"tw_{variant}", **case, time_ms=float(np.median(times)),
                         min_ms=float(times.min()), rel_err_vs_torch=err))

    torch_tflops = next((flops / r["time_ms"] / 1e9 for r in rows if r["impl"] == "torch"), None)
    for r in rows:
        r["tflops"] = flops / r["time_ms"] / 1e9
        r["ratio_vs_torch"] = r["tflops"] / torch_tflops if torch_tflops else None
        writer.write(r)
        table.append(r)
        err = "" if r["rel_err_vs_torch"] is None else f"{r['rel_err_vs_torch']:.1e}"
        ratio = "" if r["ratio_vs_torch"] is None else f"{r['ratio_vs_torch']:.2f}"
        print(f"{r['impl']:>12} {num_seqs:>4} {num_tokens:>6} {num_heads:>3}/{num_kv_heads:<2} "
              f"{r['time_ms']:>9.3f} {r['tflops']:>8.1f} {ratio:>6} {err:>8}", flush=True)


def torch_stream(cp, torch):
    """torch's current stream as a CuPy stream (newer CuPy: Stream.from_external; older: ExternalStream)."""
    ts = torch.cuda.current_stream()
    try:
        return cp.cuda.Stream.from_external(ts)
    except (AttributeError, TypeError):
        return cp.cuda.ExternalStream(ts.cuda_stream)


def parse_args(argv=None):
    p = common.parser("attention", __doc__)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384],
                   help="total new tokens per batch")
    p.add_argument("--seqs", type=int, nargs="+", default=[1, 4],
                   help="number of equal-length sequences the tokens are split into")
    p.add_argument("--heads", type=str, nargs="+", default=[f"{h}/{kv}" for h, kv in HEADS],
                   help="num_heads/num_kv_heads pairs")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="tw kernels to time: wgmma (Hopper, 128 rows/CTA), mma128 / mma64 (mma.sync, "
                        "128 or 64 rows/CTA)")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per case (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations before timing")
    p.add_argument("--no-torch", action="store_true", help="do not time torch SDPA even if importable")
    common.add_run_flags(p, tp=False)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    world = common.init(args, gpu_only="it times CUDA attention kernels against torch SDPA")
    if world.size > 1:
        raise dist.UsageError("experiments.attention runs on one GPU: start it without mpirun")

    import cupy as cp
    torch = None
    if not args.no_torch:
        try:
            import torch
            torch.cuda.init()
        except Exception as e:
            torch = None
            print(f"torch not usable ({type(e).__name__}: {e}); torch rows skipped")
    stream = torch_stream(cp, torch) if torch is not None else cp.cuda.Stream(non_blocking=True)
    writer = common.writer(args, world, "attention", torch=getattr(torch, "__version__", None))
    path = writer.path
    print(f"{world.gpu_name}, torch {writer.meta['torch']}; results -> {path}")
    print(f"{'impl':>12} {'seqs':>4} {'tokens':>6} {'heads':>6} {'time_ms':>9} {'TFLOP/s':>8} {'vs_tor':>6} "
          f"{'err':>8}")
    table = []
    for heads in args.heads:
        num_heads, num_kv_heads = map(int, heads.split("/"))
        for num_seqs in args.seqs:
            for num_tokens in args.tokens:
                run_case(num_seqs, num_tokens, num_heads, num_kv_heads, args, stream, torch, writer, table)
    return table


if __name__ == "__main__":
    main()
    dist.shutdown(0)
