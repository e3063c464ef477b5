"""notebooks/quality_vs_nfe.ipynb runs top to bottom (slow: it samples and scores a small sweep)."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quality_vs_nfe_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    monkeypatch.setenv("FASTSAMPLE_NB_NUM", "200")
    monkeypatch.setenv("FASTSAMPLE_NB_OUT", str(tmp_path))
    nb = nbformat.read(ROOT / "notebooks" / "quality_vs_nfe.ipynb", as_version=4)
    NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    assert (tmp_path / "sweep.png").is_file() and (tmp_path / "grid-unipc.png").is_file()
    assert len((tmp_path / "sweep.jsonl").read_text().splitlines()) == 8
