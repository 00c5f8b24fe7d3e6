"""Every notebook runs top to bottom on CPU (fresh kernel, repo root as cwd), so they never rot.

The notebooks assert their own claims (the loss falls, the resumed run equals the uninterrupted one,
the kernel backends agree); here we also check that each figure-making notebook produced its figures.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
MIN_FIGURES = {"quickstart.ipynb": 0, "train_and_resume.ipynb": 2, "inside_the_hybrid.ipynb": 6}


def test_notebooks_exist_and_are_stripped():
    assert {p.name for p in NOTEBOOKS} >= set(MIN_FIGURES)
    for p in NOTEBOOKS:
        nb = json.loads(p.read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert not cell.get("outputs") and cell.get("execution_count") is None, f"{p.name}: outputs not stripped"


def _kernel_name() -> str:
    """A kernel spec running this interpreter (the test venv), installed on first use."""
    from jupyter_client.kernelspec import KernelSpecManager

    name = "olmo-hybrid-test"
    ksm = KernelSpecManager()
    if name not in ksm.find_kernel_specs():
        from ipykernel.kernelspec import install

        install(kernel_name=name, user=True, display_name=f"olmo_hybrid_jax test ({sys.executable})")
    return name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    env_backup = os.environ.pop("OLMO_HYBRID_CHECKPOINT", None)  # the CPU defaults, not a user's checkpoint
    try:
        client = nbclient.NotebookClient(nb, timeout=600, kernel_name=_kernel_name(),
                                         resources={"metadata": {"path": str(NB_DIR)}})
        client.execute()
    finally:
        if env_backup is not None:
            os.environ["OLMO_HYBRID_CHECKPOINT"] = env_backup
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert len(images) >= MIN_FIGURES.get(path.name, 0), f"{path.name} made {len(images)} figures"
