"""Model presets, shard shapes, batch layout and splitting (single process, CPU)."""
import numpy as np
import pytest

from tw.model import config
from tw.model import batch as batching
from tw.comm import owned_rows


def test_presets_match_public_configs():
    m = config.get("llama3-70b")
    assert (m.hidden, m.num_heads, m.num_kv_heads, m.head_dim, m.ffn, m.num_layers, m.vocab) == \
        (8192, 64, 8, 128, 28672, 80, 128256)
    assert (m.rope_theta, m.eps, m.qkv_bias) == (500000.0, 1e-5, False)
    q = config.get("qwen2.5-72b")
    assert (q.hidden, q.num_heads, q.num_kv_heads, q.ffn, q.num_layers, q.rope_theta, q.eps, q.qkv_bias) == \
        (8192, 64, 8, 29568, 80, 1e6, 1e-6, True)
    assert config.get("llama3-70b", 4).num_layers == 4
    # Context lengths: Llama 3.1/3.3 128K; Qwen2.5-72B's model card 128K (with YaRN); Mixtral-8x22B 64K;
    # our CPU- and test-sized presets 8K.
    assert {n: p.max_context for n, p in config.PRESETS.items()} == {
        "llama3-70b": 131072, "qwen2.5-72b": 131072, "llama3-8b": 131072, "mixtral-8x22b": 65536, "tiny": 8192,
        "small": 8192, "tiny-tp8": 8192, "tiny-qwen": 8192, "tiny-moe": 8192}


def test_shard_shapes():
    s = config.ShardConfig(config.get("llama3-70b"), tp=2, rank=1)
    assert (s.num_heads, s.num_kv_heads, s.ffn, s.qkv_dim) == (32, 4, 14336, (32 + 8) * 128)
    assert config.valid_tp(config.get("llama3-70b")) == [1, 2, 4, 8]


@pytest.mark.parametrize("name,tp,msg", [("llama3-70b", 3, "must divide num_heads"),
                                         ("llama3-70b", 16, "must divide num_heads")])
def test_bad_tp_is_a_clear_error(name, tp, msg):
    with pytest.raises(ValueError, match=msg):
        config.ShardConfig(config.get(name), tp=tp, rank=0)


def test_unknown_models_refuse_clearly_and_moe_ones_load():
    with pytest.raises(ValueError, match="unknown model 'gpt5'"):
        config.get("gpt5")
    assert config.get("mixtral-8x22b").num_experts == 8   # MoE: tw/model/moe.py (CPU path); GPU refused in experiments


def test_llama3_rope_scaling_changes_only_low_frequencies():
    m = config.get("llama3-70b")
    plain = 1.0 / (m.rope_theta ** (np.arange(0, 128, 2) / 128))
    scaled = m.inv_freq()
    assert np.allclose(scaled[:10], plain[:10])           # high frequencies kept
    assert np.allclose(scaled[-5:], plain[-5:] / 8.0)     # low frequencies divided by the factor


def test_batch_layout_positions_and_slots():
    b = batching.mixed([(3, 0), (1, 5), (2, 2)])
    assert list(b.cu_seqlens) == [0, 3, 4, 6]
    assert list(b.pos) == [0, 1, 2, 5, 2, 3]
    assert list(b.slot) == [0, 1, 2, 3 + 5, 9 + 2, 9 + 3]
    assert b.kv_capacity == 13


def test_split_cuts_the_straddling_sequence():
    b = batching.mixed([(10, 0), (7, 4), (5, 0)])
    a, rest = b.split(13)
    assert [(s.new, s.prefix) for s in a.seqs] == [(10, 0), (3, 4)]
    assert [(s.new, s.prefix) for s in rest.seqs] == [(4, 7), (5, 0)]
    assert rest.offset == 13 and a.num_tokens + rest.num_tokens == b.num_tokens
    # Every token keeps its position and cache slot.
    assert np.array_equal(np.concatenate([a.pos, rest.pos]), b.pos)
    assert np.array_equal(np.concatenate([a.slot, rest.slot]), b.slot)
    with pytest.raises(ValueError, match="strictly inside"):
        b.split(0)


def test_owned_rows_partition_every_range():
    for start, end, tp in [(0, 10, 2), (3, 4, 2), (5, 5, 4), (1, 100, 8), (0, 7, 8)]:
        parts = [owned_rows(start, end, r, tp) for r in range(tp)]
        covered = [i for lo, hi in parts for i in range(lo, hi)]
        assert covered == list(range(start, end))


def test_workload_mixes_chunked_prefill_and_decode():
    b = batching.workload(300, 128, prefix=10, decode=20, decode_context=50)
    assert b.num_tokens == 300
    assert [(s.new, s.prefix) for s in b.seqs[:3]] == [(128, 10), (128, 10), (24, 10)]
    assert all((s.new, s.prefix) == (1, 50) for s in b.seqs[3:]) and len(b.seqs) == 23
    with pytest.raises(ValueError, match="at least one prefill token"):
        batching.workload(20, 8, decode=20)
