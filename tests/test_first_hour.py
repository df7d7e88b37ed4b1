"""A new user's first hour on a machine with no GPU: each mistake is one clear line from rank 0 and a
nonzero exit, quickly; nothing is silently replaced; every module is usable or plainly refuses."""
import json
import subprocess
import sys
import time

import pytest

from conftest import ROOT, gpus, run_mpi

CPU_ONLY = pytest.mark.skipif(gpus() > 0, reason="checks the CPU path (a GPU is present)")


def _user_error(proc, msg, started, limit_s=30):
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\n{out[-3000:]}"
    assert msg in out, out[-3000:]
    assert out.count(msg) == 1, f"the message should be printed once, got {out.count(msg)} copies:\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    assert time.monotonic() - started < limit_s


@CPU_ONLY
@pytest.mark.parametrize("args,msg", [
    (["--model", "nonexistent"], "unknown model 'nonexistent'"),
    (["--model", "mixtral-8x22b"], "--model mixtral-8x22b is too large for the CPU path"),
    (["--model", "llama3-70b"], "--model llama3-70b is too large for the CPU path"),
    (["--shard-as-tp", "0"], "--shard-as-tp 0 must be a positive multiple"),
    (["--shard-as-tp", "3"], "--shard-as-tp 3 must be a positive multiple"),
    (["--strategies", "nccl", "nccl"], "given more than once"),
    (["--strategies", "finegrained", "finegrained4"], "given more than once"),
    (["--strategies", "magic"], "--strategies: unknown ['magic']"),
    (["--tokens", "1"], "at least as many tokens as TP ranks"),
    (["--tp", "0"], "--tp must be >= 1"),
    (["--tp", "3"], "--tp 3 needs 3 MPI ranks"),
    (["--decode", "-1"], "--decode must be >= 0"),
    (["--decode", "64", "--tokens", "64"], "--decode 64 must be smaller than every --tokens"),
    (["--decode", "8", "--decode-context", "0"], "--decode-context must be >= 1"),
    (["--trace", "/proc/tw-not-writable"], "--trace /proc/tw-not-writable: cannot write there"),
    (["--tokens", "1000000000"], "GiB is free"),
    (["--iters", "0"], "--iters must be >= 1"),
])
def test_latency_user_errors_speak_once(args, msg):
    t0 = time.monotonic()
    proc = run_mpi(2, ["-m", "experiments.latency", *args, "--out", "/tmp/tw-test-err.jsonl"], timeout=60)
    _user_error(proc, msg, t0)


@CPU_ONLY
def test_tune_default_model_on_cpu_is_tiny_and_a_big_one_refuses():
    t0 = time.monotonic()
    proc = run_mpi(2, ["-m", "experiments.tune", "--model", "llama3-70b"], timeout=60)
    _user_error(proc, "too large for the CPU path", t0)


@CPU_ONLY
@pytest.mark.parametrize("module", ["kernels", "attention", "interference", "sm_rate", "moe"])
def test_gpu_only_modules_refuse_in_one_line(module):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", f"experiments.{module}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    _user_error(proc, f"experiments.{module} needs a GPU", t0)


@pytest.mark.parametrize("module", ["latency", "tune", "overhead", "split", "interference", "kernels",
                                    "attention", "sm_rate", "moe", "throughput"])
def test_help_shows_usage_and_defaults(module):
    proc = subprocess.run([sys.executable, "-m", f"experiments.{module}", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"usage: python -m experiments.{module}" in proc.stdout
    assert "(default:" in proc.stdout


def test_latency_help_explains_every_table_column():
    proc = subprocess.run([sys.executable, "-m", "experiments.latency", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    for col in ("ms", "vs_nccl", "rel_err", "check", "split_at", "gemm_tflops", "finegrained = finegrained4"):
        assert col in proc.stdout, col


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


@CPU_ONLY
def test_rows_record_the_world_not_the_flags(tmp_path):
    """`device` and `tp` in a row are what ran (cpu, 2), not the flags' values (auto, None)."""
    out = tmp_path / "rows.jsonl"
    proc = run_mpi(2, ["-m", "experiments.latency", "--tokens", "64", "--strategies", "nccl", "--out", str(out)],
                   timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text().splitlines()[0])
    assert (row["device"], row["tp"], row["device_flag"], row["tp_flag"]) == ("cpu", 2, "auto", None)
