"""The paper's evaluation modes: one prompt per batch (--seq-len all), the full depth (--layers all),
--paper, and experiments/overhead.py's ablations (paper Fig. 1/3). CPU runs on 2 ranks, and in-process
checks of what a GPU run would decide (memory check, tuned-choice keys, the attention grid limit)."""
import json
from types import SimpleNamespace

import pytest

from conftest import ERR_OUT, run_mpi, usage_error

from experiments import common, latency, overhead
from tw.model import config
from tw.model import batch as batching
from tw.runtime import dist
from tw.schedule import tuned
from tw.model.model import memory_estimate


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


# ---------------------------------------------------------------- latency: one prompt, full depth

def test_one_prompt_per_batch_is_split_by_tokenweave_and_passes_check(tmp_path):
    """--seq-len all: each batch is one sequence; at 700 tokens tokenweave cuts it at 350, so half B's
    attention reads half A's K/V from the cache; every strategy matches the float64 reference."""
    out = tmp_path / "rows.jsonl"
    stdout = _ok(run_mpi(2, ["-m", "experiments.latency", "--device", "cpu", "--check", "--seq-len", "all",
                             "--tokens", "300", "700", "--min-split-tokens", "512", "--out", str(out)], timeout=120))
    assert "one prompt per batch" in stdout
    rows = _rows(out)
    assert {r["tokens"] for r in rows} == {300, 700} and len(rows) == 8
    assert all(r["seqs"] == 1 and r["seq_len"] == "all" for r in rows)
    tw = {r["tokens"]: r for r in rows if r["strategy"] == "tokenweave"}
    assert tw[300]["split_at"] is None and tw[700]["split_at"] == 350
    checked = [r for r in rows if r["strategy"] != "nocomm"]
    assert checked and all(r["correct"] and r["rel_err"] <= 1e-5 for r in checked)
    ms = {(r["tokens"], r["strategy"]): r["median_ms"] for r in rows}
    for r in rows:   # the share of the comm cost still paid, from the same run's rows
        if r["strategy"] in ("nccl", "nocomm"):
            assert "comm_paid" not in r
        else:
            want = common.comm_paid(r["median_ms"], ms[r["tokens"], "nccl"], ms[r["tokens"], "nocomm"])
            assert r["comm_paid"] == want
    assert " paid " in stdout


def test_comm_paid_is_the_share_of_nccls_comm_cost():
    assert common.comm_paid(11.0, 12.0, 10.0) == 0.5      # half of nccl's 2 ms of comm still paid
    assert common.comm_paid(10.0, 12.0, 10.0) == 0.0      # all hidden
    assert common.comm_paid(9.0, 12.0, 10.0) == -0.5     # faster than removing the comm
    assert common.comm_paid(12.0, 12.0, 12.0) is None    # nothing to hide: no share
    assert common.comm_paid(12.0, None, 10.0) is None     # no nccl in the run


def test_layers_all_runs_the_presets_depth(tmp_path):
    out = tmp_path / "rows.jsonl"
    stdout = _ok(run_mpi(2, ["-m", "experiments.latency", "--device", "cpu", "--model", "tiny-qwen", "--layers",
                             "all", "--tokens", "64", "--strategies", "nccl", "--out", str(out)], timeout=60))
    depth = config.PRESETS["tiny-qwen"].num_layers
    assert all(r["layers"] == depth for r in _rows(out))
    assert f"tiny-qwen, {depth} layers (full depth)" in stdout


def test_layers_all_on_a_gpu_world_is_80_for_llama3_70b():
    """What model_config decides on a GPU (no GPU needed: only the config is built)."""
    world = SimpleNamespace(is_gpu=True, tp_size=2)
    for given, want in ((None, 4), ("all", 80), (12, 12)):
        args = SimpleNamespace(model="llama3-70b", layers=given, shard_as_tp=None)
        assert common.model_config(args, world).num_layers == want and args.layers == want


@pytest.mark.parametrize("args,msg", [
    (["--seq-len", "0"], "--seq-len must be a positive integer or 'all', got '0'"),
    (["--seq-len", "foo"], "--seq-len must be a positive integer or 'all', got 'foo'"),
    (["--layers", "many"], "--layers must be a positive integer or 'all', got 'many'"),
])
def test_bad_seq_len_and_layers_are_one_line_errors(args, msg):
    assert usage_error(latency.main, ["--device", "cpu", *args, "--out", ERR_OUT]) == msg


def test_paper_sets_its_flags_and_explicit_flags_win():
    a = latency.parse_args(["--paper"])
    assert (a.seq_len, a.layers, a.graph) == ("all", "all", False)
    assert a.strategies == ["nccl", "nocomm", "fused", "tokenweave"]
    assert a._tokens_defaults[0] == [1024, 2048, 4096, 8192, 16384, 32768, 65536]
    b = latency.parse_args(["--paper", "--seq-len", "512", "--layers", "4", "--graph", "--strategies", "nccl",
                            "--tokens", "64"])
    assert (b.seq_len, b.layers, b.graph, b.strategies, b.tokens) == ("512", "4", True, ["nccl"], [64])
    c = latency.parse_args([])
    assert (c.seq_len, c.layers, c.graph) == (1024, None, True) and c.strategies == latency.DEFAULT_STRATEGIES


def test_paper_on_the_cpu_runs_one_prompt_eagerly(tmp_path):
    out = tmp_path / "rows.jsonl"
    _ok(run_mpi(2, ["-m", "experiments.latency", "--device", "cpu", "--paper", "--tokens", "64", "--out", str(out)],
                timeout=60))
    rows = _rows(out)
    assert [r["strategy"] for r in rows] == ["nccl", "nocomm", "fused", "tokenweave"]
    assert all(r["paper"] and r["seq_len"] == "all" and r["graph"] is False and r["seqs"] == 1 for r in rows)


class _Comm:
    def allreduce(self, x, op=None):
        return x


def _gpu_world():
    return SimpleNamespace(is_gpu=True, tp_size=2, tp_rank=0, rank=0, comm=_Comm())


def test_memory_check_at_full_depth(monkeypatch):
    """llama3-70b, 80 layers, TP=2, one prompt of 64K tokens with four strategies fits an H200 (weights
    ~69 GiB: the bf16 shards, the embedding and one float32 layer while it is sharded); the float64
    reference of --check at 16K one-prompt tokens does not, and the error says why."""
    monkeypatch.setattr(common, "_available_bytes", lambda world: (int(139.8 * 2**30), "free GPU memory"))
    args = SimpleNamespace(shard_as_tp=None)
    cfg = config.get("llama3-70b")
    need = common.check_memory(args, _gpu_world(), cfg, 65536, 65536 + 1, transports=4, seq_len=65536)
    assert 90 * 2**30 < need < 110 * 2**30
    # Llama-3-70B has 70.55e9 parameters, 1.05e9 of them in the LM head (not built) and as many in the
    # embedding (replicated): (70.55 - 2 x 1.05) / 2 + 1.05 = 35.3e9 bf16 per rank = 70.5 GB, plus one
    # float32 layer (3.4 GB) while it is sharded.
    weights = memory_estimate(cfg, config.ShardConfig(cfg, 2, 0), 65536, 65537, 2, 4)["weights"]
    assert 72e9 < weights < 76e9
    with pytest.raises(dist.UsageError, match=r"llama3-70b \(80 layers\) with 16384 tokens.*drop --check"):
        common.check_memory(args, _gpu_world(), cfg, 16384, 16385, transports=4, reference_tokens=16384,
                            seq_len=16384)


def test_attention_grid_limit_is_a_usage_error():
    latency.check_attention_grid({65536: batching.prefill(65536, 65536)})  # 512 blocks: fine
    with pytest.raises(dist.UsageError, match="--tokens 65536: the batch has 65536 attention query blocks"):
        latency.check_attention_grid({65536: batching.prefill(65536, 1)})


def test_one_prompt_uses_only_choices_tuned_on_that_prompt(tmp_path, monkeypatch):
    """A choice keyed seq_len=4096 holds for a 4096-token prompt; the same file's 8192-token entry was
    two sequences of 4096, so a one-prompt run at 8192 must not use it (it uses the wave rule)."""
    from experiments import tuned_choices
    from tw.schedule.policy import Flags
    monkeypatch.setattr(tuned, "TUNED_DIR", tmp_path)
    world = SimpleNamespace(is_gpu=True, tp_size=2, gpu_tag="NVIDIA_H200", print0=lambda *a: None)
    cfg = config.get("llama3-70b", 4)
    key = tuned.TuningKey(cfg.name, 2, None, 4, "p2p", 4096, "NVIDIA_H200")
    for t in (4096, 8192):
        tuned.save(key, t, tuned.TunedChoice(split_at=t // 2, ctas_attn=8, ctas_mlp=16))
    args = SimpleNamespace(split="tuned", strategies=["tokenweave"], shard_as_tp=None, transport="p2p",
                           tokens=[4096, 8192], seq_len="all", ctas=None, ctas_mlp=None)
    flags = Flags()   # --split tuned, no CTA flag
    assert sorted(tuned_choices.load(args, world, cfg, flags, "all", args.tokens)) == [4096]
    assert sorted(tuned_choices.load(args, world, cfg, flags, 4096, args.tokens)) == [4096, 8192]
    assert tuned_choices.load(args, world, cfg, Flags(ctas=16), 4096, args.tokens) == {}


# ---------------------------------------------------------------- overhead: the paper's ablations

def test_overhead_ablations_rows_and_what_they_skip(tmp_path):
    out = tmp_path / "rows.jsonl"
    stdout = _ok(run_mpi(2, ["-m", "experiments.overhead", "--device", "cpu", "--runs", "2", "--tokens", "64",
                             "--out", str(out)], timeout=120))
    assert "comm overhead" in stdout
    rows = _rows(out)
    layers = config.PRESETS["tiny"].num_layers
    kinds = {r["kind"]: r for r in rows if r["kind"] != "summary"}
    # what one pass issued, counted at the transport: (all-reduces, add + RMSNorm kernels)
    want = {"baseline": (2, 2), "no_attn_ar": (1, 2), "no_mlp_ar": (1, 2), "no_attn_norm": (2, 1),
            "no_mlp_norm": (2, 1), "nocomm": (0, 2)}
    assert {k: (r["allreduces"] // layers, r["norms"] // layers) for k, r in kinds.items()} == want
    assert kinds["baseline"]["rel_diff_vs_baseline"] == 0
    assert all(r["rel_diff_vs_baseline"] > 1e-2 for k, r in kinds.items() if k != "baseline")  # really changed
    for r in kinds.values():
        assert len(r["run_median_ms"]) == 2 and r["std_ms"] is not None and r["model"] == "tiny"
        assert r["mean_ms"] == pytest.approx(sum(r["run_median_ms"]) / 2)
    (s,) = [r for r in rows if r["kind"] == "summary"]
    base = kinds["baseline"]["run_median_ms"]
    per_run = [((b - a) + (b - m)) / b for b, a, m in zip(base, kinds["no_attn_ar"]["run_median_ms"],
                                                           kinds["no_mlp_ar"]["run_median_ms"])]
    assert s["comm_overhead_mean"] == pytest.approx(sum(per_run) / 2)
    for key in ("comm_overhead_std", "norm_overhead_mean", "norm_overhead_std", "nccl_ms", "nocomm_ms",
                "comm_share", "allreduce_share", "norm_share"):
        assert s[key] is not None, key


_SAME_AS_STRATEGIES = """
import numpy as np
from experiments import overhead
from tw.model import config
from tw.model import batch as batching
from tw.runtime import dist
from tw.schedule import strategies as schedules
from tw.model.model import Model
world = dist.init(None, "cpu")
cfg = config.get("tiny")
model = Model(cfg, world, 200)
batch, ids = batching.prefill(200, 64), batching.token_ids(200, cfg.vocab, 0)
def run(strat):
    return strat.forward(strat.prepare(batch, ids)).copy()
_, kinds = overhead.strategies(model, world)
base, nccl = run(kinds["baseline"]), run(schedules.make("nccl", model, world))
nocomm, bound = run(kinds["nocomm"]), run(schedules.make("nocomm", model, world))
assert np.array_equal(base, nccl), "baseline must be the nccl strategy"
assert np.array_equal(nocomm, bound), "nocomm must be the latency job's nocomm"
assert not np.allclose(run(kinds["no_attn_ar"]), base), "no_attn_ar must change the output"
world.print0("SAME")
dist.shutdown(0)
"""


def test_overhead_baseline_is_nccl_and_nocomm_is_the_bound():
    assert "SAME" in _ok(run_mpi(2, ["-c", _SAME_AS_STRATEGIES], timeout=60))


def test_overhead_checks_every_model_before_building_any(capsys):
    msg = usage_error(overhead.main, ["--device", "cpu", "--models", "tiny", "nonexistent", "--out", ERR_OUT])
    assert msg.startswith("unknown model 'nonexistent'; choose one of") and "building" not in capsys.readouterr().out


def test_tune_one_prompt_keys_each_token_count_by_its_own_length(tmp_path):
    """tune --seq-len all: the batch of T tokens is one prompt, and its choice is keyed seq_len = T,
    the key experiments.latency --seq-len all looks up."""
    out = tmp_path / "tune.jsonl"
    proc = run_mpi(2, ["-m", "experiments.tune", "--seq-len", "all", "--tokens", "200", "300", "--ctas-grid", "8",
                       "--repeats", "1", "--window", "0.2", "--out", str(out)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    keys = {r["tokens"]: r["tuning_key"] for r in rows if r["kind"] == "choice"}
    assert keys == {200: "tiny-tp2-L2-p2p-seq200-cpu", 300: "tiny-tp2-L2-p2p-seq300-cpu"}, keys
