"""experiments/sm_rate.py: its derived columns and its kernel compiling (its clear exit without a GPU:
tests/test_first_hour.py).

(tests/test_compile.py compiles cuda/copy_rate.cu with every other kernel; the GPU run itself is
`python -m experiments.sm_rate` on a GPU machine.)
"""
import pytest

from conftest import usage_error
from experiments import sm_rate


def test_rates():
    # 2 GiB moved in 20 ms by 4 CTAs: 107.4 GB/s, 26.8 GB/s per SM
    r = sm_rate.rates(2 * 2**30, 20.0, 4, 132)
    assert r["sms"] == 4
    assert r["gbps"] == pytest.approx(2 * 2**30 / 0.02 / 1e9)
    assert r["gbps_per_sm"] == pytest.approx(r["gbps"] / 4)
    assert sm_rate.rates(2 * 2**30, 1.0, 264, 132)["sms"] == 132   # more CTAs than SMs: every SM busy


def test_one_cta_per_sm_shared_memory():
    # H100/H200: 228 KiB per SM, 227 KiB opt-in per block -> more than half the SM, at most the opt-in
    attrs = {"MaxSharedMemoryPerMultiprocessor": 233472, "MaxSharedMemoryPerBlockOptin": 232448}
    smem = sm_rate.one_per_sm_smem(attrs)
    assert 233472 // 2 < smem <= 232448


def test_help_names_the_columns():
    text = sm_rate.__doc__
    for col in ("ctas", "bytes", "ms", "gbps", "gbps_per_sm"):
        assert f"\n  {col} " in text


def test_held_pairs_need_even_counts():
    from experiments import sm_share
    from tw.measure import bench
    with pytest.raises(ValueError, match="cluster must be 1 or 2 and divide k"):
        bench.hold_sms(None, 7, 10.0, cluster=2)
    assert usage_error(sm_share.main, ["--beside", "pairs", "--held", "8", "5"]) == (
        "--beside pairs holds SMs in pairs: every --held must be even, got [8, 5]")
