"""tw/measure/results.py: every row's metadata, including the debug switches that change what runs."""
from tw.measure import results


def test_metadata_names_commit_and_hardware(monkeypatch):
    monkeypatch.setenv("TW_COMMIT", "abc123def456")
    for k in results.BUILD_ENV:
        monkeypatch.delenv(k, raising=False)
    meta = results.metadata(None, experiment="x")
    assert meta["commit"] == "abc123def456" and meta["experiment"] == "x" and "gpu" in meta
    assert "build_env" not in meta   # nothing switched: the default kernels


def test_metadata_records_the_debug_switches(monkeypatch):
    monkeypatch.setenv("TW_PRIVATE_X", "1")
    assert results.metadata(None)["build_env"] == {"TW_PRIVATE_X": "1"}
    monkeypatch.setenv("TW_P2P_CLUSTER", "2")   # a P2P build option: recorded by the run (p2p_cluster), not here
    assert results.metadata(None)["build_env"] == {"TW_PRIVATE_X": "1"}


def test_default_result_name_says_what_differs_and_the_tag(tmp_path, monkeypatch):
    """The writer names its file: the pulled kernel, an emulated rank's link floor and decomposition mode,
    then --tag, between the setting and the time; a tag that is not one file-name-safe word is refused."""
    import argparse

    import pytest

    from conftest import fake_world
    from experiments import common, latency
    from tw.comm.emulation import Emulation
    from tw.measure import results
    from tw.model import config
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    args = latency.parse_args(["--transport", "p2p-pull", "--tag", "trial-1"])
    args._emulation = Emulation(8, 0, 355.0, "norm")
    w = common.writer(args, fake_world(1), "latency", config.get("tiny"))
    assert w.path.name.startswith("latency-tiny-emulated-tp8-cpu-pull-link355-comm-norm-trial-1-"), w.path.name
    args = latency.parse_args([])
    assert common.writer(args, fake_world(1), "latency", config.get("tiny")).path.name.startswith("latency-tiny-tp1-cpu-2")
    with pytest.raises(argparse.ArgumentTypeError, match="letters, digits"):
        common.tag_value("a/b")
