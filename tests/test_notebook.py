"""The demo notebook runs top to bottom headless (on an untrained model when no demo run exists)."""

from __future__ import annotations

import os

import pytest

from tests.train.conftest import REPO

pytestmark = pytest.mark.slow


def test_demo_notebook_executes(demo_data, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / "demo_walkthrough.ipynb", as_version=4)
    monkeypatch.setenv("MUCO_DEMO_ROOT", str(demo_data))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # run from an empty directory: no runs/demo checkpoint there, so the untrained fallback is exercised
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    out = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "UNTRAINED" in out and "diagonal wins" in out and "nearest neighbour" in out
    assert "[         cls] Q:" in out
