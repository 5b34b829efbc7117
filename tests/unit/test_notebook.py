"""examples/quickstart.ipynb runs top to bottom (executed as a notebook, with nbclient) on the session's
small latent table and checkpoint (conftest's latent_tables), so it trains nothing here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "quickstart.ipynb"


def test_the_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def test_the_quickstart_notebook_runs_top_to_bottom(latent_tables, monkeypatch):
    monkeypatch.setenv("VAEDIST_EXAMPLE_LATENTS", latent_tables["latents"])
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # A cell that raises (the model disagreeing with its table, say) fails the run with its traceback.
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = ["".join(o.get("text", "") for o in cell.outputs) for cell in notebook.cells if cell.cell_type == "code"]
    text = "\n".join(outputs)
    assert "2000 rows" in text and "l_i (table):" in text and "loss-by-digit" in text, text
