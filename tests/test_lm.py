"""Language models: token batches, the gpt preset, the vocab-parallel loss and stage collectives.

Every parallel run of ``gpt`` is checked against one device: the loss and every gradient of one batch
(relative 1e-5, float32), with the pipeline's stash and messages poisoned by NaN. The batch masks
tokens unevenly (whole rows of one micro-batch, none of another), so a loss averaged per micro-batch
instead of over the valid tokens of the global batch shows.
"""

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from support import assert_same, single_device_mesh

from jaxmp.config import Config, ConfigError
from jaxmp.inspection.collectives import collectives
from jaxmp.models.contract import apply_model, model_parts
from jaxmp.models.layers import LayerContext, Stacked, dense, scan_layers
from jaxmp.parallel.mesh import mesh_from_spec
from jaxmp.parallel.rules import constrain
from jaxmp.parallel.sharding import path_name
from jaxmp.train import main
from jaxmp.training.data import IGNORE, Dataset
from jaxmp.training.step import build_program, cross_entropy

VOCAB, SEQ, BATCH = 24, 8, 16
TOKENS = dict(input_dtype=jnp.int32, label_shape=(SEQ,))


def gpt_config(**overrides) -> Config:
    base = dict(model="gpt", width=32, hidden=64, heads=8, depth=8, batch_size=BATCH, optimizer="sgd", lr=0.01)
    return Config().replace(**{**base, **overrides})


def token_batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and next-token labels; rows 0, 4, 8 and 12 (micro-batch 0 of 4: strided) mostly ignored."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32)
    y = np.roll(x, -1, axis=1)
    y[::4, 2:] = IGNORE
    y[1, 5:] = IGNORE
    return x, y


@functools.cache
def gpt_loss_and_grads(cfg: Config, spec: str | None, poison: bool = False):
    mesh = mesh_from_spec(spec) if spec else single_device_mesh()
    program = build_program(cfg, mesh, (SEQ,), VOCAB, poison=poison, **TOKENS)
    loss, grads = program.grad_step(program.init(), *program.put_batch(*token_batch()))
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    return float(loss), {path_name(path): np.asarray(g) for path, g in flat}


MESHES = [  # every factorisation of 8 devices into data x tensor x pipe
    "data=8",
    "data=4,tensor=2",
    "data=2,tensor=4",
    "tensor=8",
    "data=4,pipe=2",
    "data=2,tensor=2,pipe=2",
    "tensor=4,pipe=2",
    "data=2,pipe=4",
    "tensor=2,pipe=4",
    "pipe=8",
]


@pytest.mark.parametrize("spec", MESHES)
def test_gpt_equals_one_device_on_every_mesh(spec):
    pipe = int(re.search(r"pipe=(\d+)", spec)[1]) if "pipe" in spec else 1
    data = int(re.search(r"data=(\d+)", spec)[1]) if "data" in spec else 1
    cfg = gpt_config(mesh=spec, microbatches=min(4, BATCH // data) if pipe > 1 else 1)
    assert_same(gpt_loss_and_grads(cfg, spec, poison=pipe > 1), gpt_loss_and_grads(gpt_config(), None))


# zb-h1 (split backward) runs under sequence parallelism below; gpipe runs in tests/test_pipeline.py
@pytest.mark.parametrize(("schedule", "repeats"), [("interleaved-1f1b", 2)])
def test_gpt_equals_one_device_under_every_schedule(schedule, repeats):
    spec = "data=2,tensor=2,pipe=2"
    cfg = gpt_config(mesh=spec, microbatches=4, schedule=schedule, repeats=repeats)
    assert_same(gpt_loss_and_grads(cfg, spec, poison=True), gpt_loss_and_grads(gpt_config(), None))


def test_loss_is_the_mean_over_valid_tokens_of_the_global_batch():
    """The one-device loss (which every mesh equals) against the mean written out by hand with optax."""
    cfg = gpt_config()
    program = build_program(cfg, single_device_mesh(), (SEQ,), VOCAB, **TOKENS)
    state = program.init()
    x, y = token_batch()
    logits = apply_model(model_parts(program.model), state.params, jnp.asarray(x), LayerContext())
    per_token = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(y, 0)))
    valid = y >= 0
    expected = float(per_token[valid].mean())
    loss, _ = program.grad_step(state, *program.put_batch(x, y))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    mean_of_row_means = float(np.mean([per_token[i][valid[i]].mean() for i in range(BATCH)]))
    assert abs(mean_of_row_means - expected) > 1e-3  # the masking is uneven enough to tell the two apart


def test_vocab_parallel_cross_entropy_equals_optax(key):
    logits = jax.random.normal(key, (4, 6, 40)) * 3
    labels = jax.random.randint(jax.random.fold_in(key, 1), (4, 6), 0, 40)

    def ours(z):
        return cross_entropy(z, labels).sum()

    def theirs(z):
        return optax.softmax_cross_entropy_with_integer_labels(z, labels).sum()

    np.testing.assert_allclose(
        cross_entropy(logits, labels), optax.softmax_cross_entropy_with_integer_labels(logits, labels), rtol=1e-6
    )
    np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(theirs)(logits), rtol=1e-5, atol=1e-7)


def _gathers_of_vocab(program, mesh) -> list:
    return [
        c
        for c in collectives(program.train_step.compiled.as_text(), mesh)
        if c.kind == "all-gather" and VOCAB in c.shape
    ]


def test_logits_are_never_gathered_over_tensor():
    """Vocab-split head and loss: the logits' max, sum of exponentials and target logit are reduced over
    ``tensor`` ([b, T] each); no all-gather of a vocabulary-sized array. Negative control: the same
    loss on logits first made whole over tensor (what a loss that needs all of them costs)."""
    spec = "data=4,tensor=2"
    mesh = mesh_from_spec(spec)
    program = build_program(gpt_config(mesh=spec, depth=2), mesh, (SEQ,), VOCAB, **TOKENS)
    assert _gathers_of_vocab(program, mesh) == []
    per_token = [
        c
        for c in collectives(program.train_step.compiled.as_text(), mesh)
        if c.kind == "all-reduce" and c.axes == ("tensor",) and c.shape == (BATCH // 4, SEQ)
    ]
    assert len(per_token) == 3, per_token
    gathering = build_program(
        gpt_config(mesh=spec, depth=2),
        mesh,
        (SEQ,),
        VOCAB,
        loss=lambda logits, labels: cross_entropy(constrain(logits, ("batch", "seq", None)), labels),
        **TOKENS,
    )
    assert _gathers_of_vocab(gathering, mesh) != []


def test_attention_is_megatron_two_all_reduces_per_layer_each_way():
    """Q/K/V split by heads, output by rows: per block 2 all-reduces of [b, T, D] forward (attention,
    MLP) and 2 backward, over ``tensor``; nothing else moves activations inside the blocks."""
    spec = "data=4,tensor=2"
    mesh = mesh_from_spec(spec)
    depth = 2
    program = build_program(gpt_config(mesh=spec, depth=depth), mesh, (SEQ,), VOCAB, **TOKENS)
    found = collectives(program.train_step.compiled.as_text(), mesh)
    in_blocks = [c for c in found if c.axes == ("tensor",) and c.shape == (BATCH // 4, SEQ, 32)]
    # 4 per block (2 forward, 2 backward), plus the embedding's masked lookup and the head's input cotangent
    assert sum(c.count for c in in_blocks) == 4 * depth + 2, in_blocks
    assert not [c for c in found if c.kind in ("all-gather", "collective-permute", "all-to-all")]


def test_heads_must_divide_tensor():
    with pytest.raises(ConfigError, match=r"^heads 4 is not divisible by 8, the devices of mesh axes tensor"):
        build_program(gpt_config(heads=4, mesh="tensor=8"), mesh_from_spec("tensor=8"), (SEQ,), VOCAB, **TOKENS)


# ------------------------------------------------------------------ a user's fused QKV block (no hang)

D, H = 32, 4


def _linear(fan_in, fan_out, names, rngs):
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), names)
    return nnx.Linear(
        fan_in,
        fan_out,
        kernel_init=init,
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), names[1:]),
        rngs=rngs,
    )


class FusedQKV(nnx.Module):
    """The usual form: one [D, 3D] projection split by column over tensor, then jnp.split."""

    def __init__(self, rngs):
        self.qkv = _linear(D, 3 * D, ("embed", "heads"), rngs)
        self.out = _linear(D, D, ("heads", "embed"), rngs)

    def __call__(self, x, ctx):
        q, k, v = jnp.split(self.qkv(x), 3, -1)  # the line the refusal must name

        def heads(a):
            return a.reshape(*a.shape[:2], H, D // H)

        o = jax.nn.dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        return x + self.out(o.reshape(x.shape))


SPLIT_LINE = FusedQKV.__call__.__code__.co_firstlineno + 1


class Embedding(nnx.Module):
    def __init__(self, rngs):
        init = nnx.with_partitioning(nnx.initializers.normal(0.02), (None, "embed"))
        self.table = nnx.Embed(VOCAB, D, embedding_init=init, rngs=rngs)

    def __call__(self, ids, ctx):
        return self.table(ids)


class FusedModel(nnx.Module):
    def __init__(self, rngs, stacked=False):
        self.pre = Embedding(rngs)
        self.layers = nnx.List([Stacked(FusedQKV, 2, rngs=rngs)] if stacked else [FusedQKV(rngs), FusedQKV(rngs)])
        self.post = Head(rngs)


class Head(nnx.Module):
    def __init__(self, rngs):
        self.linear = _linear(D, VOCAB, ("embed", None), rngs)

    def __call__(self, h, ctx):
        return self.linear(h)


def _fused_program(spec, stacked, **kw):
    cfg = Config().replace(batch_size=BATCH, optimizer="sgd", mesh=spec, microbatches=2 if "pipe" in spec else 1)
    model_fn = functools.partial(FusedModel, stacked=stacked)
    mesh = mesh_from_spec(spec) if spec != "data=1" else single_device_mesh()
    return build_program(cfg, mesh, (SEQ,), VOCAB, model_fn=model_fn, rules={"heads": "tensor"}, **TOKENS, **kw)


@pytest.mark.parametrize("stacked", [False, True], ids=["layers", "stack"])
def test_a_fused_qkv_split_across_tensor_is_refused_in_a_pipeline_not_hung(stacked):
    """XLA moves q/k/v between tensor devices with a collective-permute inside the stage's action loop,
    which XLA:CPU runs as a rendezvous of all 8 devices: it would hang. Compiling (never running) it
    raises one line naming the split and this file's line."""
    program = _fused_program("data=2,tensor=2,pipe=2", stacked)
    with pytest.raises(ConfigError, match=rf"the model's split at .*test_lm.py:{SPLIT_LINE} ") as error:
        program.train_step.compiled  # noqa: B018
    assert "\n" not in str(error.value)


def test_the_same_fused_block_without_pipe_trains_and_equals_one_device():
    """Negative control for the refusal: outside a pipeline every device reaches the permute."""
    x, y = token_batch()

    def loss_and_grads(spec):
        program = _fused_program(spec, True)
        loss, grads = program.grad_step(program.init(), *program.put_batch(x, y))
        return float(loss), {path_name(p): np.asarray(g) for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}

    assert_same(loss_and_grads("data=2,tensor=4"), loss_and_grads("data=1"))


# ----------------------------------------------------------------------------------- token datasets


def test_token_dataset_checks_ids_and_label_shapes():
    x = np.zeros((4, SEQ), np.int32)
    assert Dataset.of((x, x)).y_train.shape == (4, SEQ)
    with pytest.raises(ConfigError, match=r"token id 30 \(example 2, position 3\) is outside the vocabulary of 24"):
        bad = x.copy()
        bad[2, 3] = 30
        Dataset.of((bad, x), classes=VOCAB)
    with pytest.raises(ConfigError, match=r"\(4, 8\) examples and \(4, 7\) labels do not pair up"):
        Dataset.of((x, x[:, 1:]))
    with pytest.raises(ConfigError, match="per-token labels need integer token ids"):
        Dataset.of((x.astype(np.float32), x))


def test_a_vocabulary_that_tensor_does_not_divide_is_one_line():
    with pytest.raises(
        ConfigError,
        match=r"parameter post.kernel of shape \(32, 10\) cannot be split over tensor \(4 devices\): 10 is not",
    ):
        build_program(
            gpt_config(heads=4, mesh="data=2,tensor=4"), mesh_from_spec("data=2,tensor=4"), (SEQ,), 10, **TOKENS
        )


# --------------------------------------------------------------------------------- the trainer, end to end

LM_RUN = ["--model", "gpt", "--dataset", "synthetic-text", "--seq-len", "16", "--width", "32", "--hidden", "64"]
LM_RUN += ["--heads", "4", "--depth", "2", "--batch-size", "16", "--synthetic-size", "512", "--no-report"]
LM_RUN += ["--tie-embeddings"]


def _losses(path) -> tuple[dict, dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}, records[-1]


def test_gpt_trains_resumes_on_another_mesh_and_writes_text(tmp_path, capsys):
    """A pipelined run with tied embeddings (the table on both end stages) saved at step 3 resumes on a
    mesh without pipe and with context (ring attention), with FSDP, and continues the loss trajectory of
    an uninterrupted run; evaluation reports perplexity, and the sample is printed."""
    pipelined = ["--mesh", "data=2,tensor=2,pipe=2", "--microbatches", "2"]
    straight = tmp_path / "straight.jsonl"
    assert main([*LM_RUN, *pipelined, "--steps", "6", "--metrics-file", str(straight), "--sample-tokens", "40"]) == 0
    out = capsys.readouterr().out
    assert "eval perplexity" in out and "what the model wrote" in out
    resumed = tmp_path / "resumed.jsonl"
    ck = ["--checkpoint-dir", str(tmp_path / "ck"), "--metrics-file", str(resumed)]
    assert main([*LM_RUN, *pipelined, "--steps", "3", *ck]) == 0
    capsys.readouterr()
    context = ["--mesh", "data=2,context=2,tensor=2", "--context-strategy", "ring", "--fsdp"]
    assert main([*LM_RUN, *context, "--steps", "6", "--resume", *ck]) == 0
    out = " ".join(capsys.readouterr().out.split())  # as one line: the console wraps long ones
    assert f"resumed from step 3 ({tmp_path / 'ck'}/3) on mesh data=2,context=2,tensor=2,pipe=1" in out, out
    assert f"wrote metrics {resumed}" in out and f"wrote checkpoints {tmp_path / 'ck'} (steps 3, 6)" in out
    (want, want_final), (got, got_final) = _losses(straight), _losses(resumed)
    assert list(got) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=2e-5)
    assert got_final["eval_perplexity"] == pytest.approx(np.exp(got_final["eval_loss"]), rel=1e-6)
    np.testing.assert_allclose(got_final["eval_loss"], want_final["eval_loss"], rtol=2e-5)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_analyze_gives_the_transformer_closed_form_and_it_matches(tied):
    """``jaxmp.analyze``: ``4*L*b*T*D`` for the blocks, ``b*T*D`` for the embedding's lookup and for the
    head's input gradient, ``3*b*T`` for the loss, against the compiled program's tensor all-reduces
    (tied: the lookup's term found through the head's table)."""
    from jaxmp.inspection.step_report import analyze_program

    spec, depth = "data=2,tensor=4", 3
    cfg = gpt_config(mesh=spec, depth=depth, tie_embeddings=tied)
    report = analyze_program(cfg, build_program(cfg, mesh_from_spec(spec), (SEQ,), VOCAB, **TOKENS))
    (tensor,) = [r for r in report.rows if (r.kind, r.axes) == ("all-reduce", ("tensor",))]
    b, width = BATCH // 2, 32
    assert tensor.predicted == 4 * depth * b * SEQ * width + 2 * b * SEQ * width + 3 * b * SEQ
    assert tensor.status == "equal", report.rows


# ---------------------------------------------------------------------------------- sequence parallelism


@pytest.mark.parametrize(
    ("spec", "schedule"),
    [("data=2,tensor=4", "1f1b"), ("data=2,tensor=2,pipe=2", "1f1b"), ("tensor=4,pipe=2", "zb-h1")],
)
def test_sequence_parallel_gpt_equals_one_device(spec, schedule):
    pipelined = "pipe" in spec
    cfg = gpt_config(mesh=spec, sequence_parallel=True, microbatches=4 if pipelined else 1, schedule=schedule)
    assert_same(gpt_loss_and_grads(cfg, spec, poison=pipelined), gpt_loss_and_grads(gpt_config(), None))


def test_dualpipev_gpt_equals_one_device():
    """Overlapped forward-backward pairs, full and split backwards, Megatron attention and messages split
    by tokens (sequence parallelism) inside stages, with data parallelism around them; M = S = 2 (mlp runs
    S = 4 and M = 2S, 2S + 1 in tests/test_pipeline.py)."""
    spec = "data=2,tensor=2,pipe=2"
    cfg = gpt_config(mesh=spec, sequence_parallel=True, microbatches=2, schedule="dualpipev")
    assert_same(gpt_loss_and_grads(cfg, spec, poison=True), gpt_loss_and_grads(gpt_config(), None))


def _tensor_and_pipe(spec: str, sequence_parallel: bool) -> list:
    cfg = gpt_config(mesh=spec, depth=2, sequence_parallel=sequence_parallel, microbatches=2 if "pipe" in spec else 1)
    mesh = mesh_from_spec(spec)
    program = build_program(cfg, mesh, (SEQ,), VOCAB, **TOKENS)
    return collectives(program.train_step.compiled.as_text(), mesh)


def test_sequence_parallel_gathers_tokens_before_each_column_matmul():
    """Without SP the blocks only all-reduce; with SP the residual stream is split by tokens, so the
    inputs of the Q/K/V and MLP-up matmuls are all-gathered first: 2 per block forward."""
    b, width, depth = BATCH // 2, 32, 2
    stream = (b, SEQ, width)

    def gathers(found):
        return sum(
            c.count for c in found if c.kind == "all-gather" and c.shape == stream and "transpose" not in c.op_name
        )

    assert gathers(_tensor_and_pipe("data=2,tensor=4", False)) == 0
    assert gathers(_tensor_and_pipe("data=2,tensor=4", True)) == 2 * depth + 1  # and the LM head's input


def test_sequence_parallel_messages_between_stages_are_split_by_tokens():
    """Each device sends 1/t of a boundary activation: [b, T*D/t] instead of [b, T*D]."""
    spec, b = "data=2,tensor=2,pipe=2", BATCH // 2 // 2

    def messages(sequence_parallel):
        found = _tensor_and_pipe(spec, sequence_parallel)
        return {c.shape for c in found if c.kind == "collective-permute" and c.axes == ("pipe",)}

    assert messages(False) == {(b, SEQ * 32)}
    assert messages(True) == {(b, SEQ * 32 // 2)}


def test_sequence_parallel_needs_a_sequence_that_tensor_divides():
    cfg = gpt_config(mesh="data=2,tensor=4", heads=4, sequence_parallel=True)
    with pytest.raises(ConfigError, match=r"^seq_len 6 is not divisible by 4, the devices of mesh axes tensor"):
        build_program(cfg, mesh_from_spec("data=2,tensor=4"), (6,), VOCAB, input_dtype=jnp.int32, label_shape=(6,))


# ---------------------------------------------------------------------------------------------- dropout


def test_dropout_masks_follow_the_layer_on_any_split():
    """Each layer of the stack folds its position into the dropout key; the middle chunks of a stack
    share one compiled branch (here chunks 1 and 2 of 4, interleaved), so the position comes from the
    table, not the branch: the masks, and so the gradients, equal one device's."""
    spec, schedule, repeats = "data=2,tensor=2,pipe=2", "interleaved-1f1b", 2
    cfg = gpt_config(dropout=0.2)
    pipelined = cfg.replace(mesh=spec, microbatches=4, schedule=schedule, repeats=repeats)
    assert_same(gpt_loss_and_grads(pipelined, spec, poison=True), gpt_loss_and_grads(cfg, None))


def test_layers_of_a_stack_draw_different_dropout_masks(key):
    """Negative control for the test above: the layers of one stack do not share a mask."""

    class Drop(nnx.Module):
        def __init__(self):
            self.scale = nnx.Param(jnp.ones(()))

        def __call__(self, h, ctx):
            return h + self.scale[...] * jax.random.bernoulli(ctx.key, 0.5, h.shape).astype(h.dtype)

    graphdef, state = nnx.split(Drop())
    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), state)
    both = scan_layers(graphdef, stacked, jnp.zeros((4, 64)), LayerContext(True, key, jnp.arange(4)))
    first, second = (jax.random.bernoulli(jax.random.fold_in(key, i), 0.5, (4, 64)).astype(jnp.float32) for i in (0, 1))
    np.testing.assert_array_equal(both, first + second)
    assert not np.array_equal(first, second)


def test_fit_takes_token_batches():
    """``jaxmp.fit`` with int32 token windows and per-token labels (some ignored): a model of your own
    (here the preset's class), trained on a 3-D mesh, loss per valid token."""
    from jaxmp import fit
    from jaxmp.models.gpt import GPT

    x, y = token_batch()
    summary = fit(
        lambda rngs: GPT(VOCAB, SEQ, width=32, hidden=64, heads=4, depth=2, rngs=rngs),
        (x, y),
        classes=VOCAB,
        mesh="data=2,tensor=2,pipe=2",
        microbatches=2,
        steps=4,
        batch_size=BATCH,
        lr=1e-2,
        report=False,
    )
    assert len(summary.losses) == 4 and summary.losses[-1] < summary.losses[0]
    assert np.isfinite(summary.eval_loss) and summary.eval_perplexity == pytest.approx(np.exp(summary.eval_loss))


# ------------------------------------------------------------------------------------------ tied embeddings


def _flat(tree) -> dict:
    return {path_name(path): np.asarray(a) for path, a in jax.tree_util.tree_flatten_with_path(tree)[0]}


@functools.cache
def tied_run(spec: str | None, schedule: str = "1f1b"):
    """A gpt whose head reuses the embedding table: the program, the loss and gradients of one batch,
    and the parameters (saved form) after two train steps on it."""
    pipelined = spec is not None and "pipe" in spec
    cfg = gpt_config(tie_embeddings=True, depth=4)
    if spec is not None:
        cfg = cfg.replace(mesh=spec, microbatches=4 if pipelined else 1, schedule=schedule)
    program = build_program(
        cfg, mesh_from_spec(spec) if spec else single_device_mesh(), (SEQ,), VOCAB, poison=pipelined, **TOKENS
    )
    state = program.init()
    batch = program.put_batch(*token_batch())
    loss, grads = program.grad_step(state, *batch)
    for _ in range(2):
        state, _ = program.train_step(state, *batch)
    return program, (float(loss), _flat(grads)), _flat(program.to_saved(state).params)


@pytest.mark.parametrize(("spec", "schedule"), [("data=2,tensor=2,pipe=2", "1f1b"), ("data=4,pipe=2", "zb-v")])
def test_tied_embeddings_train_like_one_device(spec, schedule):
    """The table is used on the first stage (lookup) and the last (head); zb-v puts both on stage 0.
    Its gradient is the sum over both uses, and after each update both stages read the new value: the
    gradients and the parameters after two steps equal one device's."""
    _, grads, params = tied_run(spec, schedule)
    _, want_grads, want_params = tied_run(None)
    assert_same(grads, want_grads)
    assert_same((0.0, params), (0.0, want_params))


def test_a_tied_table_is_stored_once_and_its_gradient_sums_both_uses():
    """One parameter in the saved tree (where ``nnx.state`` puts it: ``post.table``), none at
    ``pre.tokens``; its gradient is the lookup's plus the head's, each of them nonzero (negative
    control: a gradient that dropped either use would differ)."""
    program, (_, grads), _ = tied_run(None)
    assert "post.table" in grads and "pre.tokens" not in grads and "post.kernel" not in grads
    parts, params = model_parts(program.model), program.to_saved(program.init()).params
    x, y = (jnp.asarray(a) for a in token_batch())

    def loss_of_uses(uses):  # the loss with each use of the table as a separate input
        return cross_entropy(apply_model(parts, uses, x, LayerContext()), jnp.maximum(y, 0)).mean()

    grad = jax.jit(jax.grad(loss_of_uses))
    per_use = grad(parts.with_ties(params))
    lookup, head = np.asarray(per_use["pre"]["tokens"]), np.asarray(per_use["post"]["table"])
    assert np.abs(lookup).max() > 1e-4 and np.abs(head).max() > 1e-4
    tied = grad(params)["post"]["table"]
    np.testing.assert_allclose(tied, lookup + head, rtol=1e-5, atol=1e-7)


def test_a_tied_table_crosses_pipe_once_each_way_per_step():
    """The alias's gradient goes to the stored copy, the new value comes back: two messages of the
    table's tile ([V/t, D] per device) over ``pipe``, and nothing of the vocabulary's size gathered."""
    program, _, _ = tied_run("data=2,tensor=2,pipe=2", "1f1b")  # the run compiled above
    mesh = program.mesh
    found = collectives(program.train_step.compiled.as_text(), mesh)
    table = [c for c in found if c.kind == "collective-permute" and c.shape[-1] == VOCAB // 2 * 32]
    assert sum(c.count for c in table) == 2, table
    assert _gathers_of_vocab(program, mesh) == []


def test_a_stacked_layer_cannot_share_a_parameter():
    class Head(nnx.Module):
        def __init__(self, kernel):
            self.kernel = kernel

        def __call__(self, h, ctx):
            return h @ self.kernel[...][0]

    class Tied(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([Stacked(lambda r: dense(8, 8, (None, None), rngs=r), 2, rngs=rngs)])
            self.post = Head(self.layers[0].layer.kernel)

    with pytest.raises(ConfigError, match=r"post.kernel is the parameter layers.0.layer.kernel, and a Stacked"):
        model_parts(Tied(nnx.Rngs(0)))
