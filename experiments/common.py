"""What every experiment shares: its flags, its set-up, the CPU banner and its result file.

    p = common.parser("latency", __doc__)
    common.add_model_flags(p); common.add_tokens_flag(p, gpu=[1024, 4096], cpu=[64, 200])
    common.add_timing_flags(p); common.add_run_flags(p)
    args = p.parse_args(argv)
    world = common.init(args)                              # MPI, device, banner
    cfg = common.model_config(args, world)                 # no silent substitutions
    model = common.build_model(args, world, cfg, max_tokens, kv_capacity)   # size check first
    writer = common.writer(args, world, "latency", cfg, **fields)

User mistakes raise tw.runtime.dist.UsageError: printed once by rank 0, no traceback, exit 2.
"""
from __future__ import annotations

import argparse
import os
import time

from experiments.emulated import add_emulation_flags, check_emulation, emulation
from tw.model import config
from tw.runtime import dist
from tw.measure import results
from tw.model.model import Model, memory_estimate

CPU_MODELS = ("tiny", "tiny-qwen", "tiny-tp8", "small", "tiny-moe")
DEFAULT_MODEL = {"gpu": "llama3-70b", "cpu": "tiny"}
CPU_ITERS, CPU_WARMUP = 3, 1     # the CPU path checks correctness; more passes would only cost time
BANNER = ("=" * 78 + "\n  NO GPU: running the CPU fallback (NumPy + MPI, float32, model {model}).\n"
          "  This checks correctness only: the timings below mean nothing for GPUs.\n" + "=" * 78)


class HelpFormatter(dist.HelpFormatter):
    """--help for a person: every default spelled `(default: X)` at the end of its option's help, except
    where it says nothing: a flag is off unless given, and an option whose default is None says what
    that means in words, `(default: ...)`, or needs none (it is then simply not done)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parser(module: str, doc: str):
    """An argument parser whose help shows the defaults (HelpFormatter) and prints on rank 0 only; the
    options are listed below the description, so the usage line does not repeat them."""
    p = dist.ArgumentParser(prog=f"python -m experiments.{module}", usage="%(prog)s [options]", description=doc,
                            formatter_class=HelpFormatter)
    p.set_defaults(_module=f"experiments.{module}")
    return p


def gpu_group(p):
    """The argument group of the options only a GPU run uses."""
    return p.add_argument_group("GPU only (the CPU path runs eagerly, over MPI, with no CTAs or SM targets)")


def add_model_flags(p, layers: bool = True, shard: bool = True, models: tuple | None = None) -> None:
    """--model (or, with `models` = the GPU default list, --models: several presets, one after another),
    --layers (an int or `all`), --shard-as-tp, --seed."""
    if models:
        p.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                       help=f"model presets, run one after another (each built, measured and freed before the "
                            f"next), from {sorted(config.PRESETS)} (default: {' '.join(models)} on a GPU, "
                            f"{DEFAULT_MODEL['cpu']} on the CPU, where only {', '.join(CPU_MODELS)} fit)")
    else:
        big = [m for m in config.PRESETS if m not in CPU_MODELS]
        p.add_argument("--model", default=None, metavar="NAME",
                       help=f"{', '.join(big)}, or on the CPU {', '.join(CPU_MODELS)} (default: "
                            f"{DEFAULT_MODEL['gpu']} on a GPU, {DEFAULT_MODEL['cpu']} on the CPU)")
    if layers:
        # A string, checked in init(): a bad value is then one `error:` line like every other user error.
        p.add_argument("--layers", default=None, metavar="N|all",
                       help="decoder layers per pass, at most the preset's (all: every one) (default: 4 on a GPU, "
                            "all on the CPU)")
    if shard:
        p.add_argument("--shard-as-tp", type=int, default=None, metavar="N",
                       help="weight shards as at TP=N (a multiple of --tp) over the real TP group: TP=8's compute "
                            "per byte on 2 GPUs; outputs not the model's (default: --tp)")
        add_emulation_flags(p)
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the weights and token ids")


def add_tokens_flag(p, gpu, cpu, help: str = "batch sizes in tokens") -> None:
    p.add_argument("--tokens", type=int, nargs="+", default=None, metavar="T",
                   help=f"{help} (default: {' '.join(map(str, gpu))} on a GPU, {' '.join(map(str, cpu))} on the CPU)")
    p.set_defaults(_tokens_defaults=(list(gpu), list(cpu)))


def add_timing_flags(p, iters: int = 20, warmup: int = 5, repeats: int | None = 3) -> None:
    p.add_argument("--iters", type=int, default=iters, metavar="N",
                   help=f"timed passes per point and round (CPU: at most {CPU_ITERS})")
    p.add_argument("--warmup", type=int, default=warmup, metavar="N",
                   help=f"untimed passes first (CPU: at most {CPU_WARMUP})")
    if repeats is not None:
        p.add_argument("--repeats", type=int, default=repeats, metavar="N",
                       help="rounds over all configurations, rotated; the median of all samples counts (1 on "
                            "the CPU)")


def add_transport_flag(p) -> None:
    """--transport (p: the parser or its gpu_group)."""
    p.add_argument("--transport", choices=("p2p", "p2p-pull", "ce", "nccl"), default="p2p", metavar="KIND",
                   help="fused and tokenweave's: p2p (our kernel over CUDA IPC, partials pushed to their owner), "
                        "p2p-pull (the owner pulls them: ~half the bytes through its SMs), ce (copy engines + an "
                        "add-norm kernel), nccl (reduce-scatter, norm, all-gather)")


def add_ctas_flags(p) -> None:
    """--ctas / --ctas-mlp (p: the gpu_group), checked by check_ctas."""
    p.add_argument("--ctas", type=int, default=None, metavar="N",
                   help="comm CTAs of fused (default: every SM) and tokenweave beside attention "
                        "(default: tuned, else 8)")
    p.add_argument("--ctas-mlp", type=int, default=None, metavar="N",
                   help="the same beside the MLP (default: tuned, else --ctas)")


def add_run_flags(p, tp: bool = True) -> None:
    p.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto", metavar="D",
                   help="gpu, cpu, or auto: a GPU if usable")
    if tp:
        p.add_argument("--tp", type=int, default=None, metavar="N",
                       help="tensor-parallel degree (default: all ranks of a node)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="JSON-lines rows (default: under experiments/results/)")
    p.add_argument("--tag", default=None, type=tag_value, metavar="WORD",
                   help="a word in the file's name (without --out)")


def init(args, gpu_only: str | None = None):
    """The MPI world and this rank's device; the CPU banner; CPU-sized defaults filled into `args`.
    gpu_only: why this experiment needs a GPU (then the CPU path is refused in one line)."""
    if getattr(args, "tp", None) is not None and args.tp < 1:
        raise dist.UsageError(f"--tp must be >= 1, got {args.tp}")
    module = getattr(args, "_module", "this experiment")
    if gpu_only and args.device == "cpu":
        raise dist.UsageError(f"{module} needs a GPU: {gpu_only}; it has no CPU path (--device cpu)")
    if gpu_only and dist.gpu_count() == 0:
        raise dist.UsageError(f"{module} needs a GPU: {gpu_only}; no CUDA GPU is usable here")
    world = dist.init(getattr(args, "tp", None), args.device)
    gpu = world.is_gpu
    if hasattr(args, "_tokens_defaults"):
        args.tokens = args.tokens or args._tokens_defaults[0 if gpu else 1]
        bad = [t for t in args.tokens if t < world.tp_size]
        if bad:
            raise dist.UsageError(f"--tokens {bad}: every batch needs at least as many tokens as TP ranks "
                                  f"({world.tp_size})")
    if getattr(args, "layers", None) is not None:
        args.layers = layers_value(args.layers)
    if getattr(args, "shard_as_tp", None) is not None and (args.shard_as_tp < 1 or args.shard_as_tp % world.tp_size):
        raise dist.UsageError(f"--shard-as-tp {args.shard_as_tp} must be a positive multiple of the TP degree "
                              f"({world.tp_size})")
    check_emulation(args, world)
    read_p2p_options(args)
    for name in ("iters", "repeats"):
        if getattr(args, name, 1) < 1:
            raise dist.UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if getattr(args, "warmup", 0) < 0:
        raise dist.UsageError(f"--warmup must be >= 0, got {args.warmup}")
    if not gpu:
        if hasattr(args, "iters"):  # rows record what actually ran
            args.iters, args.warmup = min(args.iters, CPU_ITERS), min(args.warmup, CPU_WARMUP)
        if hasattr(args, "repeats"):
            args.repeats = 1
    return world


def read_p2p_options(args) -> None:
    """The P2P kernels' build switches, read from the environment once per run (TW_P2P_CLUSTER,
    TW_P2P_RUNTIME_TP: tw.comm.p2p.options_from_env) into args._p2p_options."""
    from tw.comm.p2p import options_from_env
    try:
        args._p2p_options = options_from_env()
    except ValueError as e:
        raise dist.UsageError(str(e)) from None


def p2p_options(args) -> dict:
    """The run's P2P build options ({"cluster": 1 or 2, "runtime_tp": bool}), which every P2P transport of the
    run is built with and every row records (p2p_cluster, p2p_runtime_tp)."""
    return getattr(args, "_p2p_options", None) or {"cluster": 1, "runtime_tp": False}


def check_ctas(args, world) -> None:
    """--ctas / --ctas-mlp: at least 1, and on a GPU at most its SM count (the CPU path has no CTAs)."""
    for flag in ("ctas", "ctas_mlp"):
        v, name = getattr(args, flag, None), "--" + flag.replace("_", "-")
        if v is not None and v < 1:
            raise dist.UsageError(f"{name} must be >= 1, got {v}")
        if v is not None and world.is_gpu and v > world.sm_count:
            raise dist.UsageError(f"{name} {v} must be at most the GPU's SM count, {world.sm_count}")


def tuning_key(args, world, cfg, seq_len: int):
    """The tw.schedule.tuned.TuningKey of this run's setting. An emulated rank's choices are its own (transport
    p2p-emulated[-link<G>], tp = N): tuned on stand-in peers, they must not pass for a real TP group's, and
    choices tuned without link time (where the unsplit kernel on every SM looks free) not for a link floor's."""
    from tw.schedule import tuned
    emu = emulation(args)
    if emu is not None:
        transport = f"{getattr(args, 'transport', 'p2p')}-emulated" + (f"-link{emu.link_gbps:g}" if emu.link_gbps else "")
        return tuned.TuningKey(cfg.name, emu.tp, None, cfg.num_layers, transport, seq_len, world.gpu_tag)
    return tuned.TuningKey(cfg.name, world.tp_size, args.shard_as_tp, cfg.num_layers, args.transport, seq_len,
                           world.gpu_tag)


def positive_int_or_all(value, flag: str) -> int | str:
    """A flag's value as given: a positive int, or "all"; anything else is a usage error naming `flag`."""
    if value == "all":
        return value
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise dist.UsageError(f"{flag} must be a positive integer or 'all', got {str(value)!r}")
    return n


def layers_value(value) -> int | str:
    """--layers as given: a positive int, or "all" (the preset's full depth, resolved by model_config)."""
    return positive_int_or_all(value, "--layers")


def model_config(args, world, gpu_layers: int = 4, banner: bool = True):
    """The preset named by --model, with --layers (`all`: the preset's depth). Unknown or unimplemented
    models are errors; a model too large for the CPU path is an error unless it is the default (then
    `tiny` runs, announced). banner: print the CPU banner (once per job is enough)."""
    name = args.model
    if name is not None and name not in config.PRESETS:
        raise dist.UsageError(f"unknown model {name!r}; choose one of {sorted(config.PRESETS)}")
    if not world.is_gpu:
        if name is not None and name not in CPU_MODELS:
            raise dist.UsageError(f"--model {name} is too large for the CPU path (no GPU here); use one of "
                                  f"{CPU_MODELS} or run on a GPU machine")
        if name is None:
            world.print0(f"(no GPU: the default model is {DEFAULT_MODEL['cpu']}, not {DEFAULT_MODEL['gpu']})")
        args.model = name or DEFAULT_MODEL["cpu"]
        if banner:
            world.print0(BANNER.format(model=args.model))
    args.model = args.model or DEFAULT_MODEL["gpu"]
    layers = given = getattr(args, "layers", None)
    if layers is None and world.is_gpu and hasattr(args, "layers"):
        layers = args.layers = gpu_layers
    depth = config.PRESETS[args.model].num_layers
    if isinstance(given, int) and given > depth:   # (the GPU default may exceed a test preset's 2 layers: kept)
        raise dist.UsageError(f"--layers {given}: {args.model} has {depth} layers; give at most {depth}, or all")
    cfg = config.get(args.model, None if layers == "all" else layers)
    try:
        emu = emulation(args)
        config.ShardConfig(cfg, emu.tp if emu else getattr(args, "shard_as_tp", None) or world.tp_size, 0)
    except ValueError as e:
        raise dist.UsageError(str(e)) from None
    if hasattr(args, "layers"):
        args.layers = cfg.num_layers
    return cfg


def _available_bytes(world) -> tuple[int, str]:
    """(bytes this rank may use, where the number comes from)."""
    if world.is_gpu:
        import cupy as cp
        free, _ = cp.cuda.Device().mem_info
        ranks_on_gpu = 1
        return free // ranks_on_gpu, "free GPU memory"
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return avail // world.local_size, f"available host memory / {world.local_size} ranks"


def check_memory(args, world, cfg, max_tokens: int, kv_capacity: int | None = None, transports: int = 1,
                 reference_tokens: int = 0, seq_len: int = 0) -> int:
    """Refuse (UsageError) when the memory estimate exceeds what this rank has; returns the estimate.
    Call it before building anything sized by the token counts (batches, model)."""
    emu = emulation(args)
    shard_tp = emu.tp if emu else getattr(args, "shard_as_tp", None) or world.tp_size
    shard = config.ShardConfig(cfg, shard_tp, emu.rank if emu else world.tp_rank)
    if emu:  # every emulated transport holds the buffers of its N - 1 stand-in peers too
        transports *= emu.tp
    dtype_bytes = 2 if world.is_gpu else 4
    est = memory_estimate(cfg, shard, max_tokens, kv_capacity or max_tokens, dtype_bytes, transports,
                          reference_tokens if world.rank == 0 else 0, seq_len)
    limit, source = _available_bytes(world)
    need = world.comm.allreduce(est["total"], op=_max())
    if need > 0.9 * limit:
        parts = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in est.items() if k != "total")
        hint = (" or drop --check (its float64 reference runs on rank 0 beside the model; its attention scores "
                "grow with the square of the sequence length)" if "reference" in est else "")
        raise dist.UsageError(f"{cfg.name} ({cfg.num_layers} layers) with {max_tokens} tokens needs "
                              f"~{need / 2**30:.1f} GiB per rank ({parts} GiB) but {limit / 2**30:.1f} GiB is free "
                              f"({source}); use fewer --tokens, --layers or a smaller --model{hint}")
    return need


def build_model(args, world, cfg, max_tokens: int, kv_capacity: int | None = None, transports: int = 1,
                reference_tokens: int = 0, seq_len: int = 0) -> Model:
    """Check the memory estimate against what this rank has, then build the model (with progress)."""
    need = check_memory(args, world, cfg, max_tokens, kv_capacity, transports, reference_tokens, seq_len)
    world.print0(f"building {cfg.name}: {cfg.num_layers} layers, TP={world.tp_size}, DP={world.dp_size}, up to "
                 f"{max_tokens} tokens, device={world.device} (~{need / 2**30:.1f} GiB per rank)")
    t0 = time.perf_counter()
    with dist.step(f"building {cfg.name}"):
        model = Model(cfg, world, max_tokens, kv_capacity, seed=getattr(args, "seed", 0),
                      shard_as_tp=getattr(args, "shard_as_tp", None), emulation=emulation(args))
    if model.emulation is not None:
        world.print0(model.emulation.banner + f" (playing rank {model.emulation.rank})")
    elif model.emulated:
        world.print0(f"EMULATED: weight shards sized as at TP={args.shard_as_tp}, communication over "
                     f"TP={world.tp_size}; outputs are not the model's")
    world.print0(f"built in {time.perf_counter() - t0:.1f} s")
    return model


def release(world) -> None:
    """Give the memory of dropped objects (a model, its transports) back to the device, so that the next
    model's size check (free GPU memory) and build see it: CuPy keeps freed blocks in its pool."""
    import gc
    gc.collect()
    if world.is_gpu:
        import cupy as cp
        world.comm.Barrier()
        cp.cuda.Device().synchronize()
        cp.get_default_memory_pool().free_all_blocks()


def tag(world, cfg, shard_as_tp=None, emu=None) -> str:
    """<model>-tp<TP>[-shard-as-tp<N>]-<gpu tag or cpu>, or <model>-emulated-tp<N>[-rank<R>]-<gpu tag>:
    result file names (CPU files carry `-cpu-`, which .gitignore keeps out of experiments/results/)."""
    if emu is not None:
        return f"{cfg.name}-emulated-tp{emu.tp}{f'-rank{emu.rank}' if emu.rank else ''}-{world.gpu_tag}"
    shard = f"-shard-as-tp{shard_as_tp}" if shard_as_tp and shard_as_tp != world.tp_size else ""
    return f"{cfg.name}-tp{world.tp_size}{shard}-{world.gpu_tag}"


def tag_value(value: str) -> str:
    """--tag: one word that is safe in a file name."""
    import re
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,40}", value):
        raise argparse.ArgumentTypeError(f"{value!r}: expected 1-40 letters, digits, '.', '_' or '-'")
    return value


def name_parts(args) -> list[str]:
    """What the default result file's name says beyond model, TP and GPU: the pulled kernel, an emulated
    rank's link floor and decomposition mode, then --tag."""
    emu, parts = emulation(args), []
    if getattr(args, "transport", None) == "p2p-pull":
        parts.append("pull")
    if emu is not None and emu.link_gbps:
        parts.append(f"link{emu.link_gbps:g}")
    if emu is not None and emu.comm != "full":
        parts.append(f"comm-{emu.comm}")
    if getattr(args, "tag", None):
        parts.append(args.tag)
    return parts


def writer(args, world, experiment: str, cfg=None, **fields) -> results.Writer:
    """The result writer: --out or experiments/results/<experiment>-<tag>-<time>.jsonl, every row
    carrying the run's metadata, the flags' values and `fields`."""
    emu = emulation(args)
    name = tag(world, cfg, getattr(args, "shard_as_tp", None), emu) if cfg else f"tp{world.tp_size}-{world.gpu_tag}"
    name = "-".join([name, *name_parts(args)])
    if emu is not None:
        fields = {**emu.row_fields(), **fields}
    p2p = p2p_options(args)
    fields = {"p2p_cluster": p2p["cluster"], "p2p_runtime_tp": p2p["runtime_tp"], **fields}
    flags = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("out",)}
    for k in ("device", "tp"):  # the world's values (metadata) win; the flags are kept beside them
        if k in flags:
            flags[f"{k}_flag"] = flags.pop(k)
    model = {"model": cfg.name, "layers": cfg.num_layers} if cfg else {}
    meta = results.metadata(world, **{**flags, **model, "experiment": experiment, **fields})
    return results.Writer(args.out or results.default_path(experiment, name), meta, world.rank)


def _max():
    from mpi4py import MPI
    return MPI.MAX


def shared_gpu_strategies(args, world) -> None:
    """With ranks sharing a GPU (TW_SHARE_GPU=1) NCCL cannot run: drop the NCCL strategies from
    args.strategies (saying so), refuse --transport nccl, and say that timings mean nothing."""
    if not world.shared_gpu:
        return
    from tw.schedule import strategies as schedules
    if getattr(args, "transport", None) == "nccl":
        raise dist.UsageError("--transport nccl cannot run with TW_SHARE_GPU=1 (NCCL refuses two ranks on one GPU)")
    skipped = [s for s in args.strategies if s == "nccl" or schedules.finegrained_k(s) is not None]
    args.strategies = [s for s in args.strategies if s not in skipped]
    if skipped:
        world.print0(f"TW_SHARE_GPU=1: {skipped} skipped: NCCL refuses two ranks on one GPU")
    world.print0("TW_SHARE_GPU=1: the checks still apply; TIMINGS BELOW MEAN NOTHING (ranks share one GPU)")
    if not args.strategies:
        raise dist.UsageError("no strategy left to run with TW_SHARE_GPU=1; try --strategies fused tokenweave")


def note_tp1(world) -> None:
    """At TP=1 there is nothing to communicate: every strategy runs the same compute."""
    if world.tp_size == 1:
        world.print0("note: TP=1 (one rank): there is nothing to communicate, so every strategy runs the same "
                     "compute and they should tie. Start one rank per GPU (mpirun -n 2 ...) to compare them.")


def seq_len_value(value) -> int | str:
    """--seq-len as given: a positive int, or "all" (each batch is one sequence)."""
    return positive_int_or_all(value, "--seq-len")


def seq_len_of(args, tokens: int) -> int:
    """Tokens per prefill sequence in the batch of `tokens` tokens (with --seq-len all: all of them)."""
    return tokens if args.seq_len == "all" else args.seq_len


def validate_strategies(strategies) -> None:
    """--strategies: every name known (finegrained<k> with k >= 1), none twice (finegrained = finegrained4)."""
    from tw.schedule import strategies as schedules
    seen, bad, dup = set(), [], []
    for s in strategies:
        k = schedules.finegrained_k(s)
        if s not in schedules.STRATEGIES and k is None:
            bad.append(s)
        name = f"finegrained{k}" if k is not None else s
        if name in seen:
            dup.append(s)
        seen.add(name)
    if bad:
        raise dist.UsageError(f"--strategies: unknown {bad}; choose from {schedules.STRATEGIES} "
                              "(finegrained<k> for k chunks)")
    if dup:
        raise dist.UsageError(f"--strategies: {dup} given more than once")
    if any(schedules.finegrained_k(s) == 0 for s in strategies):
        raise dist.UsageError("--strategies: finegrained needs k >= 1 chunks")


def comm_paid(cost: float, nccl: float, nocomm: float) -> float | None:
    """The share of the communication cost a strategy still pays: (cost - nocomm) / (nccl - nocomm), from
    one run's costs (ms per pass, or s per token). 0: all of it hidden; 1: as much as nccl; < 0: faster
    than removing the communication. None where nccl is not slower than nocomm (nothing to hide)."""
    if cost is None or nccl is None or nocomm is None or not nccl > nocomm:
        return None
    return (cost - nocomm) / (nccl - nocomm)

