"""Wave quantization and the split point (the paper's Fig. 9): one MLP block (gate_up GEMM, SiLU*mul,
down GEMM of this rank's shard: tw/layers.mlp_block) on T tokens, unsplit, as two equal halves, and as
the two halves the wave-aware rule picks (tw/schedule/split.py), back to back on one stream.

    mpirun -n 2 python -m experiments.split --model llama3-70b            # T = 1024, 1280, ..., 3840

A split costs nothing only if the two halves' time adds up to the unsplit time; wave quantization makes
naive halves cost more. The three cases of a T are timed round-robin (tw/measure/bench.py) as CUDA graphs.
Rows: tokens, kind (unsplit / equal / wave), split_at, mlp_ms, vs_unsplit. With --held KA KM (GPU), rows
of kind `rule` also give the wave rule's top --top picks on the plain profile (all SMs free) and on a
loaded one (attention GEMMs beside KA held SMs, MLP GEMMs beside KM, SM targets --sm-targets:
tw/schedule/profile.py), with their predicted cost; the figure of merit is where the end-to-end best of
experiments.tune ranks in each list.
"""
from __future__ import annotations

from experiments import common
from tw.measure import bench
from tw.runtime import dist, graph
from tw.schedule import split as splitting
from tw.model.layers import Part, mlp_block
from tw.schedule.profile import fill_random


def parse_args(argv=None):
    p = common.parser("split", __doc__)
    common.add_model_flags(p, layers=False, shard=False)
    common.add_tokens_flag(p, gpu=list(range(1024, 3841, 256)), cpu=[256, 512], help="token counts T")
    common.add_timing_flags(p, iters=30, warmup=5, repeats=3)
    p.add_argument("--held", type=int, nargs=2, default=None, metavar=("KA", "KM"),
                   help="also rank split points on a profile taken beside KA / KM held SMs (GPU)")
    p.add_argument("--sm-targets", type=int, nargs=2, default=None, metavar=("TA", "TM"),
                   help="SM-count targets of the loaded profile's attention / MLP GEMMs (default: none)")
    p.add_argument("--top", type=int, default=5, help="how many of each rule's best-ranked points to record")
    p.add_argument("--shard-as-tp", type=int, default=None, help="GEMM shapes of this TP degree's shards")
    common.add_run_flags(p, tp=False)
    return p.parse_args(argv)


def rows_part(lo: int, hi: int) -> Part:
    """The rows [lo, hi) as a Part: all mlp_block reads of it (no attention metadata needed)."""
    return Part(offset=lo, num_tokens=hi - lo, ids=None, pos=None, slot=None, cu_seqlens=None, kv_start=None,
                prefix=None, attn_meta=None)


def main(argv=None):
    args = parse_args(argv)
    world = common.init(args)
    args.layers = 1
    cfg = common.model_config(args, world)
    stream = world.new_stream()
    model = common.build_model(args, world, cfg, max(args.tokens))
    w, ws = model.layers[0], model.ws
    if world.is_gpu:
        fill_random(ws, ("x",))  # timed GEMMs on random data, not on a fresh model's zeros
    rule = splitting.split_rule("wave", model, world)   # on the CPU: the naive rule
    writer = common.writer(args, world, "split", cfg, split_rule=rule.source)

    def mlp(*bounds):
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            mlp_block(model, w, ws.x[lo:hi], rows_part(lo, hi), ws.residual[lo:hi], stream)

    if args.held:
        if not world.is_gpu:
            raise dist.UsageError("--held ranks split points on GEMM profiles measured on a GPU; none is used here")
        rank_rules(args, world, model, writer)
        world.print0(f"wrote {writer.path}")
        return 0
    world.print0(f"{'tokens':>7} {'unsplit_ms':>10} {'equal':>16} {'wave':>22}")
    for t in args.tokens:
        wave = rule(t)
        cases = {"unsplit": (None, (0, t)), "equal": (t // 2, (0, t // 2, t)), "wave": (wave, (0, wave, t))}
        fns = {k: (lambda b=b: mlp(*b)) for k, (_, b) in cases.items()}
        if world.is_gpu:
            fns = {k: graph.Graph(f, stream) for k, f in fns.items()}
        with dist.step(f"split T={t}"):
            ms = {k: v["median_ms"] for k, v in bench.timed(fns, world, stream, args.iters, args.warmup,
                                                              args.repeats).items()}
        for kind, (at, _) in cases.items():
            writer.write({"tokens": t, "kind": kind, "split_at": at, "mlp_ms": ms[kind],
                          "vs_unsplit": ms[kind] / ms["unsplit"]})
        u = ms["unsplit"]
        world.print0(f"{t:>7} {u:>10.3f} {ms['equal']:>9.3f} ({ms['equal'] / u:.3f}x)"
                     f" {ms['wave']:>9.3f} at {wave:>5} ({ms['wave'] / u:.3f}x)")
    world.print0(f"wrote {writer.path}")
    return 0


def rank_rules(args, world, model, writer):
    """The wave rule's best-ranked split points on the plain and on the loaded profile (rows kind=rule)."""
    from tw.schedule.profile import GemmProfile
    profiles = {"plain": GemmProfile(model),
                "loaded": GemmProfile(model, held=tuple(args.held), targets=tuple(args.sm_targets or (None, None)))}
    for t in args.tokens:
        for name, prof in profiles.items():
            top = splitting.wave_shortlist(t, prof, args.top)
            cost = [prof(s) + prof(t - s) for s in top]
            writer.write({"tokens": t, "kind": "rule", "profile": name, "held": list(prof.held),
                          "sm_targets": list(prof.targets), "ranked": top, "predicted_ms": cost})
            world.print0(f"{t:>7} {name:>6}: " + ", ".join(f"{s} ({c:.3f} ms)" for s, c in zip(top, cost)))
    if world.rank == 0:
        for prof in profiles.values():
            prof.save()


if __name__ == "__main__":
    dist.shutdown(main())
