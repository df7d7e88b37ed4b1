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
