"""Every notebook runs top to bottom on CPU (fresh kernel, repo root as cwd), so they never rot.

The kernel is this interpreter, through a kernelspec in a temporary Jupyter dir; Jupyter's, IPython's
and matplotlib's dirs and the notebooks' TMPDIR are temporary too, so the tests write nothing elsewhere.

The notebooks assert their own claims (the loss falls, the resumed run equals the uninterrupted one,
the kernel backends agree); here we also check that each figure-making notebook produced its figures.
"""

from __future__ import annotations

import json
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
                assert not cell.get("outputs") and cell.get("execution_count") is None, \
                    f"{p.name}: outputs not stripped"


KERNEL = "olmo-hybrid-test"


@pytest.fixture(scope="module")
def jupyter_home(tmp_path_factory):
    """Jupyter's and IPython's data, runtime and config dirs in a temporary directory, with a kernelspec
    running this very interpreter (so nothing is written to ~ and a stale spec can never be picked up)."""
    from ipykernel.kernelspec import write_kernel_spec

    root = tmp_path_factory.mktemp("jupyter")
    with pytest.MonkeyPatch.context() as mp:
        for var, sub in (("JUPYTER_DATA_DIR", "data"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                         ("JUPYTER_CONFIG_DIR", "config"), ("IPYTHONDIR", "ipython"), ("MPLCONFIGDIR", "mpl")):
            mp.setenv(var, str(root / sub))
        write_kernel_spec(root / "kernels" / KERNEL, overrides={"display_name": f"olmo_hybrid_jax ({sys.executable})"})
        yield root / "kernels"


def _kernel_manager(kernel_dirs, connection_file):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    ksm = KernelSpecManager(kernel_dirs=[str(kernel_dirs)], ensure_native_kernel=False)
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=ksm, connection_file=str(connection_file))
    assert km.kernel_spec.argv[0] == sys.executable
    return km


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, jupyter_home, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    monkeypatch.delenv("OLMO_HYBRID_CHECKPOINT", raising=False)  # the CPU defaults, not a user's checkpoint
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' tempfile.mkdtemp() run dirs
    km = _kernel_manager(jupyter_home, tmp_path / "kernel.json")
    client = nbclient.NotebookClient(nb, km=km, timeout=600,
                                     resources={"metadata": {"path": str(NB_DIR)}})
    client.execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    assert len(images) >= MIN_FIGURES.get(path.name, 0), f"{path.name} made {len(images)} figures"
