"""Context parallelism: the gpt preset with its sequence split over a ``context`` mesh axis.

Every configuration is checked against one device: the loss and every gradient of one batch (relative
1e-5, float32). The sequence is 24 tokens (not a power of two: chunk edges fall at 3, 6 and 12 tokens),
and the labels mask tokens unevenly, so labels or masks left in the wrong order after the head-tail
permutation would show. The ring kernel on its own is tested in ``tests/test_ring_attention.py``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import assert_same, single_device_mesh

from jaxmp.config import Config
from jaxmp.inspection.step_report import analyze_program
from jaxmp.parallel.mesh import mesh_from_spec
from jaxmp.parallel.sharding import path_name
from jaxmp.training.data import IGNORE
from jaxmp.training.step import build_program

VOCAB, SEQ, BATCH = 16, 24, 8
TOKENS = dict(input_dtype=jnp.int32, label_shape=(SEQ,))


def gpt_config(**overrides) -> Config:
    base = dict(model="gpt", width=16, hidden=32, heads=4, depth=4, batch_size=BATCH, optimizer="sgd", lr=0.01)
    return Config().replace(**{**base, **overrides})


def token_batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32)
    y = np.roll(x, -1, axis=1)
    y[::4, 5:] = IGNORE  # the tail of some rows: under head-tail order it sits on every device
    y[1, :7] = IGNORE
    return x, y


def program_on(cfg: Config, spec: str | None):
    mesh = mesh_from_spec(spec) if spec else single_device_mesh()
    return build_program(cfg, mesh, (SEQ,), VOCAB, **TOKENS)


@functools.cache
def loss_and_grads(cfg: Config, spec: str | None):
    program = program_on(cfg, spec)
    loss, grads = program.grad_step(program.init(), *program.put_batch(*token_batch()))
    return float(loss), {path_name(p): np.asarray(g) for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}


def reference(**overrides):
    return loss_and_grads(gpt_config(**overrides), None)


CASES = [  # (mesh, options): each strategy at C = 2, 4, 8; with tensor (and SP), data, FSDP and pipe
    ("context=2", dict(context_strategy="all-gather")),
    ("context=8", dict(context_strategy="all-gather", context_balance=False)),
    ("context=2", dict(context_strategy="ring")),
    ("context=4,data=2", dict(context_strategy="ring", fsdp=True)),
    ("context=8", dict(context_strategy="ring", context_balance=False)),
    ("context=4,tensor=2", dict(context_strategy="ring", sequence_parallel=True)),
    ("context=2,tensor=4", dict(context_strategy="ulysses", heads=8)),
    ("context=4", dict(context_strategy="ulysses")),
    ("context=8", dict(context_strategy="ulysses", heads=8, context_balance=False)),
    ("data=2,context=2,tensor=2", dict(context_strategy="all-gather", sequence_parallel=True)),
    ("context=2,tensor=2,pipe=2", dict(context_strategy="ulysses", schedule="zb-h1", microbatches=2)),
    ("data=1,context=2,tensor=2,pipe=2", dict(sequence_parallel=True, schedule="1f1b", microbatches=4)),
]


@pytest.mark.parametrize(("spec", "options"), CASES, ids=[f"{s}-{o}" for s, o in CASES])
def test_gpt_with_context_equals_one_device(spec, options):
    model = {k: v for k, v in options.items() if k == "heads"}
    assert_same(loss_and_grads(gpt_config(mesh=spec, **options), spec), reference(**model))


def test_pipeline_messages_stay_split_by_sequence():
    """Between stages each device sends its own part of the sequence (its tokens over context, and over
    tensor too under SP), not the whole activation."""
    spec = "context=2,tensor=2,pipe=2"
    for sp, axes in ((False, ("context",)), (True, ("context", "tensor"))):
        cfg = gpt_config(mesh=spec, sequence_parallel=sp, microbatches=4)
        assert program_on(cfg, spec).pipeline.train.message_axes == axes


def test_dropout_masks_follow_the_tokens_true_positions():
    """Head-tail order moves the tokens; each keeps the dropout mask of its position (one device's)."""
    options = dict(dropout=0.3)
    assert_same(loss_and_grads(gpt_config(mesh="context=4", **options), "context=4"), reference(**options))


@functools.cache
def _analysed(strategy: str, spec: str = "context=4"):
    cfg = gpt_config(mesh=spec, depth=2, heads=8, context_strategy=strategy)
    return analyze_program(cfg, program_on(cfg, spec))


@pytest.mark.parametrize(
    ("strategy", "exchange"),
    [("all-gather", "all-gather"), ("ring", "collective-permute"), ("ulysses", "all-to-all")],
)
def test_each_strategy_exchanges_keys_and_values_its_own_way(strategy, exchange):
    """Over context: the strategy's own collective and the gradients' all-reduce, nothing else, each
    equal to its closed form (module docstring of jaxmp.inspection.closed_forms)."""
    rows = {row.kind: row for row in _analysed(strategy).rows if row.axes == ("context",)}
    assert set(rows) == {exchange, "all-reduce", "scalar all-reduce"}, rows
    for kind in (exchange, "all-reduce"):
        assert rows[kind].measured == rows[kind].predicted > 0, rows[kind]


def test_the_ring_sends_what_the_closed_form_says_next_to_tensor_and_data():
    """data=2,context=2,tensor=2: the ring's collective-permutes and the Megatron all-reduces both match."""
    rows = {(row.kind, row.axes): row for row in _analysed("ring", "data=2,context=2,tensor=2").rows}
    for key in (("collective-permute", ("context",)), ("all-reduce", ("tensor",)), ("all-reduce", ("context",))):
        assert rows[key].measured == rows[key].predicted > 0, rows[key]
