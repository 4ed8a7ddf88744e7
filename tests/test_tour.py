"""The tour notebook runs from top to bottom, so the documentation cannot rot."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

TOUR = Path(__file__).resolve().parents[1] / "docs" / "tour.ipynb"


@pytest.mark.slow
def test_tour_notebook_runs_and_shows_pictures(tmp_path, monkeypatch):
    notebook = nbformat.read(TOUR, as_version=4)
    # The kernel inherits the environment: a fixed thread count keeps it from fighting the test runner.
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    # Every section ends on a picture: grid, overlay, features, deconv, scan, occlusion, probe.
    assert len(pictures) >= 7
    assert list(tmp_path.iterdir()) == []  # the tour writes no files
