"""Multi-rank CPU runs of the model, the strategies and the main job (NumPy + MPI, float32)."""
import sys

import pytest

from conftest import ROOT, requires_gpus, run_mpi


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.mark.parametrize("ranks,model", [(2, "tiny"), (2, "tiny-qwen"), (4, "tiny"), (8, "tiny-tp8")])
def test_strategies_match_reference_and_tp1(ranks, model):
    out = _ok(run_mpi(ranks, ["-m", "tests.mpi_model", "--device", "cpu", "--model", model]))
    assert "ALL PASS" in out and f"TP={ranks} equals TP=1" in out


def test_one_failing_rank_aborts_the_job():
    proc = run_mpi(2, ["-m", "tests.mpi_fail"], timeout=60)
    assert proc.returncode != 0
    assert "[rank 1]" in proc.stderr and "deliberate failure on rank 1" in proc.stderr


def test_tp_larger_than_world_without_mpirun():
    """The job's shape is checked by dist.init, which only a real job runs: one process, --tp 2."""
    import subprocess
    proc = subprocess.run([sys.executable, "-m", "experiments.latency", "--device", "cpu", "--tp", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "error: --tp 2 needs 2 MPI ranks on one node, but this node has 1: launch with mpirun -n 2 python -m ... "
        "(one rank per GPU)"], proc.stderr


@pytest.mark.parametrize("module", ["experiments.overhead", "experiments.split"])
def test_figure_experiments_run_on_cpu(module, tmp_path):
    out = tmp_path / "rows.jsonl"
    proc = run_mpi(2, ["-m", module, "--device", "cpu", "--out", str(out)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NO GPU" in proc.stdout and len(out.read_text().splitlines()) >= 2


def test_tune_procedure_runs_on_cpu(tmp_path):
    out = tmp_path / "tune.jsonl"
    proc = run_mpi(2, ["-m", "experiments.tune", "--device", "cpu", "--model", "tiny", "--layers", "2", "--tokens",
                       "256", "--ctas-grid", "8", "16", "--repeats", "2", "--window", "0.25", "--out", str(out)],
                   timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    kinds = [r["kind"] for r in rows]
    assert kinds.count("ctas") == 4 and "choice" in kinds and kinds.count("split") >= 3
    assert kinds.count("unsplit") == 1  # not splitting is measured beside the split points
    # The choice follows from the timed rows (not from its own fields): the fastest split point, and
    # split only where some split point beat not splitting.
    choice = next(r for r in rows if r["kind"] == "choice")
    splits = {r["split_at"]: r["median_ms"] for r in rows if r["kind"] == "split"}
    unsplit = next(r["median_ms"] for r in rows if r["kind"] == "unsplit")
    assert choice["split_at"] == min(splits, key=splits.get)
    assert choice["split"] == (min(splits.values()) < unsplit)
    assert choice["wave_split"] in splits and choice["tuning_key"].startswith("tiny-tp2-L2-p2p-seq1024-cpu")


def test_mixed_prefill_decode_batches_match_reference():
    out = _ok(run_mpi(2, ["-m", "experiments.latency", "--device", "cpu", "--check", "--tokens", "300",
                          "--decode", "20", "--decode-context", "50", "--prefix", "10", "--seq-len", "128",
                          "--strategies", "nccl", "fused", "tokenweave", "finegrained2", "--min-split-tokens",
                          "100", "--out", "/tmp/tw-test-mixed.jsonl"]))
    assert "FAIL" not in out and out.count(" ok") >= 4


@requires_gpus(1)
@pytest.mark.parametrize("ranks", [2, 4])
def test_model_on_gpu_ranks_sharing_gpus(ranks):
    """Every strategy vs the float64 reference on GPU ranks, eager and under CUDA graphs; with fewer GPUs
    than ranks they share them (TW_SHARE_GPU=1: P2P over CUDA IPC, NCCL strategies skipped)."""
    from conftest import gpus
    if gpus() >= ranks:
        env = {}
    else:
        env = {"TW_SHARE_GPU": "1"}
    proc = run_mpi(ranks, ["-m", "tests.mpi_model", "--device", "gpu", "--model", "small", "--quick"], timeout=900,
                   env=env)
    out = _ok(proc)
    assert "ALL PASS" in out and "under a CUDA graph" in out
