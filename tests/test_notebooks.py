"""Execute every notebook in notebooks/ top to bottom; any cell error fails the test.

Why: notebooks teach with numbers read off compiled programs and ``assert`` them against the textbook, so a
notebook that no longer runs, or whose numbers drifted, must break CI like any other test. Parametrized over
the glob, so a new notebook is covered without touching this file.

The kernel is a separate process: the 8 simulated devices of ``conftest.py`` do not reach it, and each
notebook sets up its own devices (``simulate_cpu_devices``) before JAX starts. The kernel runs this very
interpreter (``sys.executable``, i.e. the venv's Python): its kernelspec is written to a temporary folder for
the session, so no ``ipykernel install`` step is needed and no user- or system-wide ``python3`` kernelspec
can substitute another Python.

The notebooks are committed with their outputs, so figures and tables show when the repository is
browsed; ``python tests/test_notebooks.py [NAME ...]`` re-executes them and writes the outputs back.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from conftest import FAST_COMPILE
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.utils import run_sync
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL, TIMING_KERNEL = "python3", "python3-as-a-reader"
# Notebooks that print wall-clock times run their code as a reader's would; the others compile fast, as the
# tests do (conftest.py's FAST_COMPILE: the same HLO, buffers and collectives, slower machine code).
REPORT_TIMINGS = {"06_language_model.ipynb"}


@pytest.fixture(scope="session")
def kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the two kernelspecs, which start ``sys.executable`` with JAX on CPU."""
    return write_kernel(tmp_path_factory.mktemp("kernels"))


def write_kernel(folder: Path) -> Path:
    """:data:`KERNEL` with the tests' XLA flags, :data:`TIMING_KERNEL` with the user's (no FAST_COMPILE)."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    for name, extra in ((KERNEL, [FAST_COMPILE]), (TIMING_KERNEL, [])):
        kept = " ".join(dict.fromkeys([*(flag for flag in flags if flag != FAST_COMPILE), *extra]))
        write_kernel_spec(folder / name, overrides={"env": {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": kept}})
    return folder


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_executes(path: Path, kernel_dir: Path):
    execute(path, kernel_dir)


def execute(path: Path, kernel_dir: Path):
    """Run ``path`` top to bottom in a fresh kernel; returns the notebook with its outputs."""
    notebook = nbformat.read(path, as_version=4)
    manager = AsyncKernelManager(
        kernel_name=TIMING_KERNEL if path.name in REPORT_TIMINGS else KERNEL,
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]),
    )
    client = NotebookClient(notebook, km=manager, timeout=600, resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()  # raises CellExecutionError (with the cell and traceback) on the first failing cell
    finally:  # the client does not stop a kernel it did not start: each would keep its devices and memory
        run_sync(manager.shutdown_kernel)(now=True)
    return notebook


if __name__ == "__main__":
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        kernels = write_kernel(Path(folder))
        for path in NOTEBOOKS:
            if len(sys.argv) == 1 or path.name in sys.argv[1:]:
                nbformat.write(execute(path, kernels), path)
                print("wrote", path.name)
