"""The notebooks and the figure script run on the committed result files (CI executes them)."""
from pathlib import Path

import pytest

from conftest import ROOT

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("matplotlib")


@pytest.mark.parametrize("name", ["figures", "traces"])
def test_notebook_executes(name):
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_figures_from_result_files(tmp_path):
    from experiments import figures
    assert figures.main(["--out", str(tmp_path)]) == 0
    made = sorted(p.name for p in Path(tmp_path).iterdir())
    for name in ("latency_speedup", "kernels", "split", "attention"):
        assert f"{name}.png" in made and f"{name}.pdf" in made
