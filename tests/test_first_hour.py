"""A new user's first hour on a machine with no GPU: each mistake is one clear line from rank 0 and a
nonzero exit, quickly; nothing is silently replaced; every module is usable or plainly refuses."""
import importlib
import json
import re
import subprocess
import sys
import time

import pytest

from conftest import ERR_OUT, ROOT, fake_world, gpus, help_text, printed_lines, run_mpi, usage_error
from experiments import latency, latency_report, tune

CPU_ONLY = pytest.mark.skipif(gpus() > 0, reason="checks the CPU path (a GPU is present)")


CPU_MODELS = "('tiny', 'tiny-qwen', 'tiny-tp8', 'small', 'tiny-moe')"
PRESETS = "['llama3-70b', 'llama3-8b', 'mixtral-8x22b', 'qwen2.5-72b', 'small', 'tiny', 'tiny-moe', 'tiny-qwen', 'tiny-tp8']"


@pytest.mark.parametrize("args,msg", [
    (["--model", "nonexistent"], f"unknown model 'nonexistent'; choose one of {PRESETS}"),
    (["--model", "mixtral-8x22b"], "--model mixtral-8x22b is too large for the CPU path (no GPU here); use one of "
                                   f"{CPU_MODELS} or run on a GPU machine"),
    (["--model", "llama3-70b"], "--model llama3-70b is too large for the CPU path (no GPU here); use one of "
                                f"{CPU_MODELS} or run on a GPU machine"),
    (["--shard-as-tp", "0"], "--shard-as-tp 0 must be a positive multiple of the TP degree (2)"),
    (["--shard-as-tp", "3"], "--shard-as-tp 3 must be a positive multiple of the TP degree (2)"),
    (["--strategies", "nccl", "nccl"], "--strategies: ['nccl'] given more than once"),
    (["--strategies", "finegrained", "finegrained4"], "--strategies: ['finegrained4'] given more than once"),
    (["--strategies", "magic"], "--strategies: unknown ['magic']; choose from ('nccl', 'nocomm', 'fused', "
                                "'finegrained', 'tokenweave') (finegrained<k> for k chunks)"),
    (["--strategies", "finegrained0"], "--strategies: finegrained needs k >= 1 chunks"),
    (["--tokens", "1"], "--tokens [1]: every batch needs at least as many tokens as TP ranks (2)"),
    (["--tp", "0"], "--tp must be >= 1, got 0"),
    (["--decode", "-1"], "--decode must be >= 0, got -1"),
    (["--decode", "64", "--tokens", "64"], "--decode 64 must be smaller than every --tokens value [64]"),
    (["--decode", "8", "--decode-context", "0"], "--decode-context must be >= 1, got 0"),
    (["--iters", "0"], "--iters must be >= 1, got 0"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--ctas", "0"], "--ctas must be >= 1, got 0"),           # (the CPU has no SM count to bound it above)
    (["--ctas-mlp", "-2"], "--ctas-mlp must be >= 1, got -2"),
    (["--min-split-tokens", "-1"], "--min-split-tokens must be >= 2 (two halves), got -1"),
    (["--layers", "80"], "--layers 80: tiny has 2 layers; give at most 2, or all"),
    (["--prefix", "100000"], "a sequence of 101024 tokens (100000 cached by --prefix + 1024 new) is more than tiny's "
                             "context of 8192; use a shorter --prefix or --seq-len, or fewer --tokens"),
    (["--seq-len", "all", "--tokens", "9000"], "a sequence of 9000 tokens (0 cached by --prefix + 9000 new) is more "
                                               "than tiny's context of 8192; use a shorter --prefix or --seq-len, or "
                                               "fewer --tokens"),
    (["--decode", "8", "--decode-context", "8192"], "--decode-context 8192 + 1 new token is more than tiny's "
                                                    "context of 8192 tokens"),
])
def test_latency_user_errors(args, msg):
    """Each mistake is one UsageError naming its flag, found before anything is built (checked in this
    process on the CPU world of `mpiexec -n 2`; test_a_user_error_is_one_line_and_exit_2 runs one for real)."""
    assert usage_error(latency.main, [*args, "--out", ERR_OUT]) == msg


def test_latency_user_errors_that_depend_on_the_machine():
    msg = usage_error(latency.main, ["--trace", "/proc/tw-not-writable", "--out", ERR_OUT])
    assert msg.startswith("--trace /proc/tw-not-writable: cannot write there ("), msg   # (the OS's reason)
    msg = usage_error(latency.main, ["--tokens", "1000000000", "--out", ERR_OUT])
    assert re.fullmatch(r"tiny \(2 layers\) with 1000000000 tokens needs ~[\d.]+ GiB per rank \(weights [\d.]+, kv "
                        r"[\d.]+, workspace [\d.]+ GiB\) but [\d.]+ GiB is free \(available host memory / 2 ranks\); "
                        r"use fewer --tokens, --layers or a smaller --model", msg), msg


def test_ctas_on_a_gpu_are_bounded_by_its_sm_count():
    from types import SimpleNamespace

    from experiments import common
    from tw.runtime import dist
    h200 = fake_world(gpu=True, sm_count=132)
    common.check_ctas(SimpleNamespace(ctas=132, ctas_mlp=1), h200)
    with pytest.raises(dist.UsageError) as e:
        common.check_ctas(SimpleNamespace(ctas=8, ctas_mlp=133), h200)
    assert str(e.value) == "--ctas-mlp 133 must be at most the GPU's SM count, 132"
    common.check_ctas(SimpleNamespace(ctas=500, ctas_mlp=None), fake_world())   # the CPU path has no CTAs


def test_a_user_error_is_one_line_and_exit_2():
    """End to end, as a user meets it: two ranks, `error: <message>` once (rank 0), exit status 2, no
    traceback, quickly. (How every rank comes to end so: tests/test_launch.py.)"""
    argv = ["--model", "nonexistent", "--out", ERR_OUT]
    t0 = time.monotonic()
    proc = run_mpi(2, ["-m", "experiments.latency", *argv], timeout=60)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert printed_lines(proc.stderr) == [f"error: {usage_error(latency.main, argv)}"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr and time.monotonic() - t0 < 30


def test_tune_default_model_on_cpu_is_tiny_and_a_big_one_refuses():
    assert usage_error(tune.main, ["--model", "llama3-70b"]) == (
        f"--model llama3-70b is too large for the CPU path (no GPU here); use one of {CPU_MODELS} or run on a GPU "
        "machine")


GPU_ONLY = {"kernels": "it times the P2P and NCCL kernels",
            "attention": "it times CUDA attention kernels against torch SDPA",
            "interference": "it overlaps two CUDA streams, which the CPU fallback does not have",
            "sm_rate": "it times a CUDA copy kernel",
            "sm_share": "it times cuBLAS GEMMs beside SMs held by a kernel",
            "moe": "it times the GPU MoE block"}


@CPU_ONLY
@pytest.mark.parametrize("module", sorted(GPU_ONLY))
def test_gpu_only_modules_refuse_in_one_line(module):
    main = importlib.import_module(f"experiments.{module}").main
    assert usage_error(main, []) == f"experiments.{module} needs a GPU: {GPU_ONLY[module]}; no CUDA GPU is usable here"
    assert usage_error(main, ["--device", "cpu"]) == (f"experiments.{module} needs a GPU: {GPU_ONLY[module]}; it has "
                                                      "no CPU path (--device cpu)")


@CPU_ONLY
def test_a_gpu_only_module_without_a_launcher_says_so_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "experiments.kernels"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [f"error: experiments.kernels needs a GPU: {GPU_ONLY['kernels']}; no CUDA GPU "
                                        "is usable here"], proc.stderr


@pytest.mark.parametrize("module", ["latency", "tune", "overhead", "split", "interference", "kernels",
                                    "attention", "sm_rate", "sm_share", "moe", "throughput"])
def test_help_shows_usage_and_defaults(module, monkeypatch, capsys):
    out = help_text(module, monkeypatch, capsys)
    assert f"usage: python -m experiments.{module}" in out
    assert "(default:" in out


def test_latency_help_explains_every_table_column(monkeypatch, capsys):
    out = help_text("latency", monkeypatch, capsys)
    for col in ("layers", "ms", "vs_nocomm", "vs_nccl", "paid", "rel_err", "check", "split_at", "gemm_tflops",
                "proj_vs_nccl", "proj_paid", "finegrained = finegrained4"):
        assert re.search(rf"(?<![\w<]){re.escape(col)}(?![\w<])", out), col   # a word of its own


@pytest.mark.parametrize("module", ["latency", "throughput"])
def test_help_a_person_reads(module, monkeypatch, capsys):
    """Short (latency: a screen and a half at 80 columns), the GPU-only options in their own group, every
    default spelled `(default: X)` and none that says nothing (None, False)."""
    out = help_text(module, monkeypatch, capsys)
    if module == "latency":
        assert len(out.splitlines()) <= 100, len(out.splitlines())
    gpu_only = out[out.index("\nGPU only"):]
    gpu_only = gpu_only[:gpu_only.find("\n\n", 1) % len(gpu_only) or None]
    want = ("--transport", "--ctas", "--ctas-mlp") + (("--graph", "--graph-priority", "--sm-target", "--tuned-file")
                                                      if module == "latency" else ())
    assert all(f"  {flag} " in gpu_only or f"  {flag}," in gpu_only for flag in want), gpu_only
    flat = " ".join(out.split())
    assert "(default: None)" not in flat and "(default: False)" not in flat and "(default: True)" not in flat
    assert not re.search(r"[^(]default[^:s]", flat.replace("(default: ", "")), flat


def test_the_cpu_table_shows_no_share_paid_and_fits_long_names(capsys):
    """CPU timings mean nothing, so neither do vs_nocomm and paid (a user saw 2751% and -694%); a long
    strategy name widens its column instead of shifting the rest."""
    from types import SimpleNamespace

    from tw.model import config
    rows = [{"tokens": 64, "strategy": s, "median_ms": ms, "vs_nocomm": 1.5, "speedup_vs_nccl": 1.25,
             "comm_paid": -6.94, "split_at": None, "rel_err": 1e-7, "correct": True}
            for s, ms in (("nccl", 12.5), ("finegrained16", 10.0))]
    args = SimpleNamespace(seq_len=1024, graph=True, repeats=1, iters=3, _emulation=None)
    latency_report.print_table(fake_world(), rows, config.get("tiny"), args)
    head, *lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("layers", "     2"))]
    assert [line.split() for line in lines] == [
        ["2", "64", "nccl", "12.500", "-", "1.250x", "-", "1.00e-07", "ok", "-"],
        ["2", "64", "finegrained16", "10.000", "-", "1.250x", "-", "1.00e-07", "ok", "-"]]
    for col in ("ms", "vs_nccl", "paid", "check", "split_at"):   # right-aligned: each ends where its title ends
        end = head.index(f" {col}") + len(col) + 1
        assert all(line[end - 1] != " " and (len(line) == end or line[end] == " ") for line in lines), (col, lines)


@CPU_ONLY
def test_cpu_main_job_is_quick_splits_and_records_what_ran(tmp_path):
    out = tmp_path / "rows.jsonl"
    t0 = time.monotonic()
    proc = run_mpi(2, ["-m", "experiments.latency", "--check", "--out", str(out)], timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(no GPU: the default model is tiny" in proc.stdout and "mean nothing" in proc.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tw = [r for r in rows if r["strategy"] == "tokenweave"]
    assert any(r["split_at"] for r in tw), "the CPU main job should include a token count that splits"
    assert all(r["split_source"] == "naive" for r in tw if r["split_at"])
    assert all(r["iters"] <= 3 and r["warmup"] <= 1 and r["repeats"] == 1 for r in rows)  # what actually ran
    assert all(r["correct"] for r in rows if "correct" in r)
    # `device` and `tp` in a row are what ran (cpu, 2), not the flags' values (auto, None)
    assert all((r["device"], r["tp"], r["device_flag"], r["tp_flag"]) == ("cpu", 2, "auto", None) for r in rows)
    assert elapsed < 60, f"the CPU main job took {elapsed:.0f} s"


@CPU_ONLY
def test_cpu_result_files_carry_cpu_in_their_name():
    from types import SimpleNamespace

    from experiments import common
    from tw.model import config
    world = SimpleNamespace(tp_size=2, gpu_tag="cpu")
    assert "-cpu" in common.tag(world, config.get("tiny"))


def test_kernel_floor_counts_the_sm_traffic():
    """64 KiB of SM traffic per 16 KiB row for the fused op at TP=2 (docs/design.md#targets), and the
    per-SM rate comes from the committed sm_rate file."""
    from experiments import kernels
    assert kernels.sm_bytes("p2p_fused", 8192, 8192, 2) == 8192 * 4 * 16384
    assert kernels.sm_bytes("p2p_fused_copy", 1, 8192, 2) == 6 * 16384
    assert kernels.sm_bytes("p2p_ar", 2, 8192, 2) == 3 * 2 * 16384
    assert kernels.sm_bytes("nccl_ar", 2, 8192, 2) is None
    rate, source = kernels.per_sm_gbps()
    assert source == "sm_rate-H200.jsonl" and 90 < rate < 110
