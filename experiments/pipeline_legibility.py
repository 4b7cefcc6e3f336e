"""How hard ``jaxmp/pipeline`` is to read, in three figures: its files and lines, its longest functions,
and how many jaxmp frames deep a chunk's forward runs inside a tick, from ``python -m jaxmp.train``.

Run (seconds; prints the figures for the checkout first on ``sys.path``)::

    python experiments/pipeline_legibility.py
    PYTHONPATH=/path/to/older/checkout python experiments/pipeline_legibility.py   # before
"""

from __future__ import annotations

import ast
import contextlib
import runpy
import sys
import traceback
from pathlib import Path


def sizes(root: Path) -> None:
    functions = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                functions.append((node.end_lineno - node.lineno + 1, f"{path.name}:{node.name}"))
    lines = {p.name: len(p.read_text().splitlines()) for p in root.glob("*.py")}
    print(f"{len(lines)} files, {sum(lines.values())} lines; largest {max(lines.items(), key=lambda kv: kv[1])}")
    print("longest functions:", sorted(functions, reverse=True)[:3])


def call_depth() -> None:
    """Wrap the chunk's forward (``apply``; before the split: ``_Chunk.run``) and train one step."""
    try:
        from jaxmp.pipeline.actions import ChunkActions as chunk_class

        name = "apply"
    except ImportError:
        from jaxmp.pipeline.engine import _Chunk as chunk_class

        name = "run"
    original, found = getattr(chunk_class, name), {}

    def recorded(*args, **kwargs):
        frames = [f for f in traceback.extract_stack() if "/jaxmp/" in f.filename]
        if "path" not in found and any(f.name == "tick" for f in frames):  # inside a tick, not a trace ahead
            found["path"] = [f"{Path(f.filename).name}:{f.name}" for f in frames]
        return original(*args, **kwargs)

    setattr(chunk_class, name, recorded)
    sys.argv = ["jaxmp.train", "--cpu-devices", "2", "--mesh", "pipe=2", "--microbatches", "2", "--steps", "1"]
    with contextlib.suppress(SystemExit):  # the CLI exits when done
        runpy.run_module("jaxmp.train", run_name="__main__")
    print(f"call depth to a chunk's forward: {len(found['path'])} jaxmp frames")
    print(" -> ".join(found["path"]))


if __name__ == "__main__":
    import jaxmp

    sizes(Path(jaxmp.__file__).parent / "pipeline")
    call_depth()
