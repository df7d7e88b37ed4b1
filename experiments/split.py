"""Wave quantization and the split point (the paper's Fig. 9): one MLP block (gate_up GEMM, SiLU*mul,
down GEMM of this rank's shard) on T tokens, unsplit, as two equal halves, and as the two halves the
wave-aware rule picks (tw/split.py), back to back on one stream.

    mpirun -n 2 python -m experiments.split --model llama3-70b            # T = 1024, 1280, ..., 3840

A split costs nothing only if the two halves' time adds up to the unsplit time; wave quantization makes
naive halves cost more. Rows: tokens, kind (unsplit / equal / wave), split_at, mlp_ms, vs_unsplit.
"""
from __future__ import annotations

import argparse

from tw import bench, config, dist, ops, results
from tw import split as splitting
from tw.model import Model


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="mpirun -n <TP> python -m experiments.split", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model preset (default: llama3-70b on GPU, tiny on CPU)")
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="token counts (default: 1024..3840 in steps of 256 on GPU, 256 512 on CPU)")
    p.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto", help="auto: GPU if usable")
    p.add_argument("--iters", type=int, default=30, help="timed repetitions")
    p.add_argument("--warmup", type=int, default=5, help="untimed repetitions first")
    p.add_argument("--out", default=None, help="result file (JSON lines)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    world = dist.init(None, args.device)
    gpu = world.is_gpu
    cfg = config.get(args.model or ("llama3-70b" if gpu else "tiny"), 1)
    tokens_list = args.tokens or (list(range(1024, 3841, 256)) if gpu else [256, 512])
    if not gpu:
        world.print0("NO GPU: CPU fallback, timings mean nothing")
    stream = world.new_stream()
    model = Model(cfg, world, max(tokens_list), seed=0)
    w, ws = model.layers[0], model.ws
    if gpu:
        splitting.fill_random(ws, ("x",))  # timed GEMMs on random data, not on a fresh model's zeros
    split_fn = splitting.split_function("wave", model, world)
    writer = results.Writer(args.out or results.default_path("split", f"{cfg.name}-tp{world.tp_size}"),
                            results.metadata(world, model=cfg.name, iters=args.iters), world.rank)

    def mlp(lo, hi):
        r = slice(lo, hi)
        ops.linear(ws.x[r], w.wgate_up, ws.gate_up[r], stream)
        ops.silu_mul(ws.gate_up[r], ws.act[r], stream)
        ops.linear(ws.act[r], w.wdown, ws.residual[r], stream)

    def timed(fn):
        return bench.median_ms(fn, world, stream, args.iters, args.warmup)

    world.print0(f"{'tokens':>7} {'unsplit ms':>10} {'equal':>16} {'wave':>22}")
    for t in tokens_list:
        wave = split_fn(t)
        unsplit = timed(lambda: mlp(0, t))
        cases = {"unsplit": (None, unsplit), "equal": (t // 2, timed(lambda: (mlp(0, t // 2), mlp(t // 2, t)))),
                 "wave": (wave, timed(lambda: (mlp(0, wave), mlp(wave, t))))}
        for kind, (at, ms) in cases.items():
            writer.write({"tokens": t, "kind": kind, "split_at": at, "mlp_ms": ms, "vs_unsplit": ms / unsplit})
        world.print0(f"{t:>7} {unsplit:>10.3f} {cases['equal'][1]:>9.3f} ({cases['equal'][1] / unsplit:.3f}x)"
                     f" {cases['wave'][1]:>9.3f} at {wave:>5} ({cases['wave'][1] / unsplit:.3f}x)")
    world.print0(f"wrote {writer.path}")
    return 0


if __name__ == "__main__":
    dist.shutdown(main())
