"""Tuned choices (tw/schedule/tuned.py) and how tokenweave's plan carries them (no GPU needed)."""
import json
from types import SimpleNamespace

import pytest
from mpi4py import MPI

from tw.model import config
from tw.model import batch as batching
from tw.schedule import tuned
from tw.schedule import strategies as schedules
from tw.model.model import Model

KEY = tuned.TuningKey("llama3-70b", 2, None, 4, "p2p", 1024, "NVIDIA_H200")


@pytest.fixture
def tuned_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(tuned, "TUNED_DIR", tmp_path)
    return tmp_path


def test_key_spells_every_field_and_shard_equal_to_tp_is_not_emulated():
    assert KEY.tag == "llama3-70b-tp2-L4-p2p-seq1024-NVIDIA_H200"
    assert tuned.TuningKey("llama3-70b", 2, 2, 4, "p2p", 1024, "NVIDIA_H200") == KEY
    assert tuned.TuningKey("llama3-70b", 2, 8, 4, "p2p", 1024, "NVIDIA_H200").tag.startswith("llama3-70b-tp2-shard8-")


def test_save_load_round_trip(tuned_dir):
    c = tuned.TunedChoice(1792, 32, 8, wave_split=2048, median_ms=23.5, extra={"shortlist": [2048, 1792]})
    tuned.save(KEY, 4096, c)
    tuned.save(KEY, 8192, tuned.TunedChoice(None, 8, 8, split=False))
    got = tuned.load(KEY)
    assert got[4096] == c and got[8192].split is False and sorted(got) == [4096, 8192]


def test_another_setting_is_named_not_used(tuned_dir):
    tuned.save(KEY, 4096, tuned.TunedChoice(1792, 32, 8))
    other = tuned.TuningKey("llama3-70b", 2, None, 8, "nccl", 1024, "NVIDIA_H200")  # --layers 8 --transport nccl
    assert tuned.load(other) == {}
    msg = tuned.mismatch(other)
    assert "layers=4" in msg and "this run: 8" in msg and "transport='p2p'" in msg
    assert tuned.mismatch(KEY) is None


def test_a_file_whose_key_disagrees_with_its_name_is_an_error(tuned_dir):
    tuned.save(KEY, 4096, tuned.TunedChoice(1792, 32, 8))
    data = json.loads(KEY.path.read_text())
    data["key"]["layers"] = 80
    KEY.path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="holds choices for"):
        tuned.load(KEY)


def test_bad_choices_are_refused():
    with pytest.raises(ValueError, match="split_at > 0"):
        tuned.TunedChoice(None, 8, 8)
    with pytest.raises(ValueError, match="CTA budgets"):
        tuned.TunedChoice(100, 0, 8)


def test_committed_tuned_files_load_under_their_own_key():
    files = sorted(tuned.TUNED_DIR.glob("tokenweave-*.json"))
    assert files, "experiments/tuned/ should hold the tuned choices the README quotes"
    for path in files:
        key = tuned.TuningKey(**json.loads(path.read_text())["key"])
        assert key.path == path
        assert all(c.ctas_attn >= 1 for c in tuned.load(key).values())


def _cpu_tokenweave(min_tokens=64):
    world = SimpleNamespace(is_gpu=False, tp_size=1, tp_rank=0, tp_comm=MPI.COMM_SELF, sm_count=0, rank=0)
    model = Model(config.get("tiny", 1), world, 512)
    return schedules.make("tokenweave", model, world, min_split_tokens=min_tokens, ctas=4, ctas_mlp=2)


def test_plan_carries_the_split_and_the_budgets_that_run():
    tw = _cpu_tokenweave()
    b = batching.prefill(300, 100)
    plan = tw.prepare(b)
    assert (plan.split_at, plan.split_source, plan.ctas_attn, plan.ctas_mlp) == (150, "naive", 4, 2)
    plan = tw.prepare(b, choice=tuned.TunedChoice(128, 16, 8))
    assert (plan.split_at, plan.split_source, plan.ctas_attn, plan.ctas_mlp) == (128, "tuned", 16, 8)
    plan = tw.prepare(b, choice=tuned.TunedChoice(None, 16, 8, split=False))
    assert (plan.split_at, plan.split_source, len(plan.parts)) == (None, "tuned-unsplit", 1)
    plan = tw.prepare(batching.prefill(40, 20))
    assert (plan.split_at, plan.split_source) == (None, "below-threshold")
    with pytest.raises(ValueError, match="strictly inside"):
        tw.prepare(b, choice=tuned.TunedChoice(300, 8, 8))


def test_forward_is_a_function_of_the_plan():
    """Two plans of one batch prepared before either runs give their own results: nothing of the
    first plan's setting is left on the strategy for the second to pick up."""
    import numpy as np
    tw = _cpu_tokenweave()
    b = batching.prefill(300, 100)
    ids = batching.token_ids(300, 1000, 0)
    p1 = tw.prepare(b, ids, tuned.TunedChoice(128, 16, 8))
    p2 = tw.prepare(b, ids, tuned.TunedChoice(None, 16, 8, split=False))
    out2 = np.array(tw.forward(p2))
    out1 = np.array(tw.forward(p1))
    assert p1.split_at == 128 and p2.split_at is None
    assert np.allclose(out1, out2, rtol=1e-4, atol=1e-4)  # same model output either way (TP=1: no comm)
