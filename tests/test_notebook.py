"""notebooks/analysis.ipynb executes, cell by cell in a real kernel, on a tiny run: it cannot rot unnoticed."""

from __future__ import annotations

import os

import pytest
from helpers import ROOT, composed

from kvbench.app import run

NEEDS = "executing the notebook needs the notebook extra (nbclient, nbformat, ipykernel): pip install -e '.[notebook]'"


def test_notebook_executes_on_a_tiny_run(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason=NEEDS)
    nbformat = pytest.importorskip("nbformat", reason=NEEDS)
    pytest.importorskip("ipykernel", reason=NEEDS)
    run_dir = run(composed(tmp_path, "run_name=tiny", "budget=[16,32]"))["run_dir"]
    out = tmp_path / "report"
    notebook = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4)
    (parameters,) = [i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])]
    # As papermill does: the injected cell after the `parameters` cell overrides its values.
    notebook.cells.insert(
        parameters + 1, nbformat.v4.new_code_cell(f"RUNS = [Path({str(run_dir)!r})]\nOUT = Path({str(out)!r})")
    )
    # The kernel is a new process: it imports this checkout's kvbench.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    )
    client.execute()
    printed = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "| snapkv | 16 |" in printed and "| snapkv | 32 |" in printed  # the paper table, one line per budget
    assert "kv_mib: KV cache held right after compression" in printed  # the summary's legend
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # accuracy_vs_budget, accuracy_vs_kv_mib, niah_heatmap shown inline
    assert (out / "table.tex").exists() and (out / "niah" / "niah_heatmap.pdf").exists()
