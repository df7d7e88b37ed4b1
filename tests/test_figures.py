"""experiments/figures.py: fails loudly, reads only the files it names, never draws CPU-fallback rows.

Every test writes figures into a tmp dir; none touches experiments/figures/.
"""
import json
import shutil
import subprocess

import pytest

from conftest import ROOT

pytest.importorskip("matplotlib")
from experiments import figures  # noqa: E402

REAL_RESULTS = figures.RESULTS_DIR
CPU_META = {"device": "cpu", "gpu": "none (CPU fallback: timings not meaningful)", "sm_count": 0}


@pytest.fixture
def results(tmp_path, monkeypatch):
    """An empty results dir that figures reads instead of experiments/results/."""
    d = tmp_path / "results"
    d.mkdir()
    monkeypatch.setattr(figures, "RESULTS_DIR", d)
    return d


@pytest.fixture
def drawn(monkeypatch):
    """What each saved figure showed: {name: {"titles": [...], "lines": [line labels]}}."""
    seen = {}
    real = figures._save

    def save(fig, name, out_dir):
        seen[name] = {"titles": [ax.get_title() for ax in fig.axes] + [t.get_text() for t in fig.texts]
                      + ([fig._suptitle.get_text()] if getattr(fig, "_suptitle", None) else []),
                      "lines": [ln.get_label() for ax in fig.axes for ln in ax.get_lines()]}
        return real(fig, name, out_dir)

    monkeypatch.setattr(figures, "_save", save)
    return seen


def _copy(name, dst_dir, as_name=None):
    dst = dst_dir / (as_name or name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(REAL_RESULTS / name, dst)
    return dst


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cpu_rows(name):
    """The committed rows of `name`, relabelled as a CPU-fallback run."""
    return [{**r, **CPU_META} for r in figures.read(REAL_RESULTS / name)]


# ---------------------------------------------------------------- 1: main's exit status

def test_main_fails_naming_a_missing_file(results, tmp_path, capsys):
    out = tmp_path / "out"
    assert figures.main(["--out-dir", str(out), "--only", "overhead"]) != 0
    err = capsys.readouterr().err
    assert "FAILED overhead" in err and "overhead-llama3-70b-tp2-H200.jsonl" in err and "missing" in err
    assert not out.exists() or not any(out.iterdir())


def test_main_fails_when_no_result_file_is_there(results, tmp_path, capsys):
    assert figures.main(["--out", str(tmp_path / "out")]) != 0  # every figure's file is missing
    err = capsys.readouterr().err
    for name, files in figures.FIGURE_FILES.items():
        assert f"FAILED {name}:" in err and files[0] in err


def test_main_fails_naming_an_empty_file(results, tmp_path, capsys):
    (results / "split-tp2-H200.jsonl").write_text("")
    assert figures.main(["--out-dir", str(tmp_path / "out"), "--only", "split_mlp"]) != 0
    err = capsys.readouterr().err
    assert "FAILED split_mlp" in err and "split-tp2-H200.jsonl" in err and "empty" in err


def test_main_fails_when_a_figure_does_not_draw_but_draws_the_rest(tmp_path, monkeypatch, capsys):
    def broken(paths, out_dir):
        raise RuntimeError("boom")
    monkeypatch.setitem(figures.DRAW, "kernels", broken)
    out = tmp_path / "out"
    assert figures.main(["--out-dir", str(out), "--only", "kernels", "overhead"]) == 1
    err = capsys.readouterr().err
    assert "FAILED kernels: RuntimeError: boom" in err and "figures not drawn: kernels" in err
    assert (out / "overhead.png").exists() and not (out / "kernels.png").exists()


def test_main_returns_zero_and_writes_only_the_out_dir(tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in figures.FIG_DIR.iterdir()}
    for flag in ("--out-dir", "--out"):
        out = tmp_path / flag.strip("-")
        assert figures.main([flag, str(out), "--only", "overhead", "split_mlp"]) == 0
        assert sorted(p.name for p in out.iterdir()) == ["overhead.pdf", "overhead.png",
                                                         "split_mlp.pdf", "split_mlp.png"]
    assert {p.name: p.stat().st_mtime_ns for p in figures.FIG_DIR.iterdir()} == before


def test_drawing_a_missing_file_raises_with_its_name(tmp_path):
    missing = tmp_path / "latency-nothing-here.jsonl"
    with pytest.raises(FileNotFoundError, match="latency-nothing-here.jsonl.*missing"):
        figures.fig_latency(missing, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="missing"):
        figures.fig_timeline([tmp_path / "trace-none.csv"], tmp_path / "out")


# ---------------------------------------------------------------- 2: kernel_history reads its paths

def test_kernel_history_draws_the_paths_it_is_given(results, tmp_path, drawn):
    elsewhere = tmp_path / "elsewhere"
    known = _copy("kernels-H200x2-warp-per-row.jsonl", elsewhere)
    other = _copy("kernels-H200x2-run14.jsonl", elsewhere, as_name="kernels-mine.jsonl")
    out = tmp_path / "out"
    written = figures.fig_kernel_history([known, other], out)
    assert (out / "kernel_history.png").exists() and (out / "kernel_history.pdf").exists()
    assert set(written) == {out / "kernel_history.png", out / "kernel_history.pdf"}
    labels = drawn["kernel_history"]["lines"]
    assert "warp per row, no block barriers (kernels-H200x2-warp-per-row.jsonl)" in labels
    assert "kernels-mine (kernels-mine.jsonl)" in labels
    assert not any("run14" in lb for lb in labels)  # only the files passed, none from RESULTS_DIR


def test_kernel_history_missing_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="kernels-gone.jsonl"):
        figures.fig_kernel_history([tmp_path / "kernels-gone.jsonl"], tmp_path / "out")


# ---------------------------------------------------------------- 3: named files only, no CPU rows

def test_a_newer_cpu_file_is_not_used(results, tmp_path, drawn):
    committed = "overhead-llama3-70b-tp2-H200.jsonl"
    _copy(committed, results)
    _write(results / "overhead-zzz-cpu-20991231.jsonl", _cpu_rows(committed)[:2])  # sorts last, newest
    figures.main(["--out", str(tmp_path / "out")])  # the other figures' files are missing here: rc 1
    titles = " ".join(drawn["overhead"]["titles"])
    assert committed in titles and "cpu" not in titles and "NVIDIA H200" in titles


def test_cpu_rows_in_a_named_file_are_ignored(results, tmp_path, drawn):
    committed = "overhead-llama3-70b-tp2-H200.jsonl"
    gpu = figures.read(REAL_RESULTS / committed)
    no_device = [{k: v for k, v in r.items() if k != "device"} | {"gpu": "none"} for r in gpu[:1]]
    _write(results / committed, _cpu_rows(committed) + gpu + no_device)
    assert figures.load(results / committed) == gpu
    assert figures.is_cpu_row({"device": "cpu"}) and figures.is_cpu_row({"gpu": "none (CPU fallback)"})
    assert not figures.is_cpu_row(gpu[0]) and not figures.is_cpu_row({"gpu": "NVIDIA H200"})
    figures.draw("overhead", tmp_path / "out")
    assert "NVIDIA H200" in drawn["overhead"]["titles"][0]


def test_a_cpu_only_named_file_fails(results, tmp_path, capsys):
    committed = "overhead-llama3-70b-tp2-H200.jsonl"
    _write(results / committed, _cpu_rows(committed))
    with pytest.raises(ValueError, match="only CPU-fallback rows"):
        figures.load(results / committed)
    assert figures.main(["--out-dir", str(tmp_path / "out"), "--only", "overhead"]) == 1
    assert "FAILED overhead" in capsys.readouterr().err


def test_cpu_traces_are_refused():
    cpu = REAL_RESULTS / "traces-cpu-sample" / "trace-tiny-tp2-nccl-1100.csv"
    with pytest.raises(ValueError, match="CPU-fallback"):
        figures.load_trace(cpu)
    gpu = REAL_RESULTS / "traces-H200x2" / "trace-llama3-70b-tp2-nccl-4096.csv"
    assert figures.load_trace(gpu) and figures.trace_meta(gpu)["gpu"] == "NVIDIA H200"


def test_every_figure_names_committed_gpu_files():
    assert set(figures.FIGURE_FILES) == set(figures.DRAW)
    names = [n for files in figures.FIGURE_FILES.values() for n in files]
    assert not any(c in n for n in names for c in "*?[")  # names, not patterns
    try:
        tracked = set(subprocess.run(["git", "ls-files", "experiments/results"], cwd=ROOT, capture_output=True,
                                     text=True, check=True).stdout.split())
    except (OSError, subprocess.CalledProcessError):
        tracked = None
    for n in names:
        p = REAL_RESULTS / n
        assert (figures.load_trace(p) if p.suffix == ".csv" else figures.load(p)), n
        if tracked is not None:
            assert f"experiments/results/{n}" in tracked, f"{n} is not committed"
