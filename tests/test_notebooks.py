"""The Colab notebooks in ``colabs/`` run from top to bottom, and the committed copies carry their outputs.

Each notebook is executed in a fresh Jupyter kernel (nbclient) with ``DIFFLAX_NOTEBOOK_SMALL=1``,
which the notebooks read to shrink training steps and sample counts; any cell that raises fails
the test. The kernel starts in ``colabs/`` (as a notebook opened there would), writes its
temporary files under the test's ``tmp_path``, and the notebook file itself is not modified.

At the small size nearly all of a notebook's time is XLA compiling its jitted programs, which
then run for milliseconds, so the kernel compiles with XLA's optimizations off
(:data:`FAST_COMPILE`): about a third less compile time, the same code and the same checks.
"""

import base64
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

COLABS = Path(__file__).resolve().parents[1] / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))
MAX_NOTEBOOK_BYTES = 2_000_000  # committed with outputs: PNG plots at modest dpi stay well below this
# Compile fast, run slower: JAX skips most of its optimization work, XLA's CPU backend its LLVM passes.
FAST_COMPILE = {
    "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
    "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
}


def _images(nb):
    return [
        out["data"]["image/png"]
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]


def test_there_are_notebooks():
    names = {p.name for p in NOTEBOOKS}
    for expected in (
        "quickstart.ipynb",
        "solvers.ipynb",
        "guidance.ipynb",
        "likelihood.ipynb",
        "compose.ipynb",
        "distillation.ipynb",
    ):
        assert expected in names, f"colabs/{expected} is missing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_outputs(path):
    """The notebooks are read on GitHub: every code cell ran, in order, plots included, no errors."""
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES, f"{path.name} is {path.stat().st_size} bytes"
    nb = nbformat.read(path, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    counts = [cell.get("execution_count") for cell in code]
    assert all(c is not None for c in counts), f"{path.name}: cells without outputs (execution counts {counts})"
    assert counts == sorted(counts), f"{path.name}: cells were run out of order ({counts})"
    errors = [out for cell in code for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, f"{path.name}: committed with an error output: {errors[0].get('ename')}"
    images = _images(nb)
    assert images, f"{path.name} has no plots in its outputs"
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    """Execute every cell at the small size; a cell error raises ``CellExecutionError``."""
    monkeypatch.setenv("DIFFLAX_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' temporary work directories
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", FAST_COMPILE["JAX_DISABLE_MOST_OPTIMIZATIONS"])
    monkeypatch.setenv("XLA_FLAGS", " ".join(filter(None, [os.environ.get("XLA_FLAGS"), FAST_COMPILE["XLA_FLAGS"]])))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(COLABS)}})
    client.execute()
    assert _images(nb), f"{path.name} drew no plots when executed"
