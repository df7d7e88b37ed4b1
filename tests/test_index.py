"""experiments/results/INDEX.md (experiments/index.py): every committed result file is listed, the index
matches its generator, every file a document cites is there, logs sit in logs/, and every run in
archive/ is replaced by a newer run of the same configuration."""
import os
import subprocess

import pytest

from conftest import ROOT
from experiments import index
from tw.measure.results import read


def test_the_index_is_current_and_every_cited_file_exists():
    found = index.problems()
    assert not found, "\n".join(found)


def test_every_committed_result_file_is_in_the_index():
    try:
        tracked = subprocess.run(["git", "ls-files", "experiments/results"], cwd=ROOT, capture_output=True,
                                 text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    text = index.INDEX.read_text()
    listed = {f.removeprefix("experiments/results/") for f in tracked} - {"INDEX.md"}
    assert listed, "no committed result files"
    missing = sorted(f for f in listed if f"`{f}`" not in text)
    assert not missing, f"committed but not in INDEX.md (run python -m experiments.index): {missing}"


def test_a_moved_or_misspelt_citation_is_reported():
    texts = {"doc": "moved: `gpu-check-H200x1-ce-rules.log`; wrong folder: `logs/sm_rate-H200.jsonl`; "
                    "fine: `logs/gpu-check-H200x1-ce-rules.log`, experiments/results/sm_rate-H200.jsonl, "
                    "`archive/tune-llama3-70b-tp2-H200.jsonl`; not a file name: `...-tp8-shards-H200.jsonl`"}
    assert index.missing_citations(texts) == ["doc: gpu-check-H200x1-ce-rules.log", "doc: logs/sm_rate-H200.jsonl"]


def test_a_run_is_archived_only_behind_a_newer_run_that_measures_all_it_did():
    old, new = "tune-llama3-70b-tp2-H200.jsonl", "tune-llama3-70b-tp2-H200-warm-profile.jsonl"
    old_rows, new_rows = read(index.RESULTS / "archive" / old), read(index.RESULTS / new)
    assert index.not_replaced(old, old_rows, new, new_rows) == []
    backwards = index.not_replaced(new, new_rows, old, old_rows)
    assert any("not older" in w for w in backwards) and any("does not measure" in w for w in backwards)
    other = "latency-llama3-70b-tp2-H200-e2e-tuned.jsonl"
    assert any("configuration" in w for w in index.not_replaced(old, old_rows, other, read(index.RESULTS / other)))


def test_gpu_check_names_its_log_and_leaves_it_in_results_logs(tmp_path):
    (tmp_path / "experiments" / "results").mkdir(parents=True)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "RES": str(tmp_path / "res"), "TW_COMMIT": "abc1234"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check"), "no-such-section"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "unknown section no-such-section" in proc.stdout, proc.stdout + proc.stderr
    logs = sorted(p.name for p in (tmp_path / "experiments" / "results" / "logs").iterdir())
    assert len(logs) == 1 and logs[0].startswith("gpu-check-") and logs[0].endswith("-no-such-section-abc1234.log")
    assert (tmp_path / "out" / logs[0]).is_file()   # the copy a device call returns
