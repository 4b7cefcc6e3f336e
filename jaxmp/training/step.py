"""The train step: loss, ``value_and_grad``, optax update — the one place where jit, shardings and
donation live.

Shapes: B = global batch, C = classes, T = tokens; ``x`` is ``[B, ...]`` (images NHWC, features, or int32
token ids ``[B, T]``), ``y`` is ``[B]`` (one label per example) or ``[B, T]`` (one per token).

Loss accounting: every label counts with weight ``1 / (valid labels in the global batch)`` and a negative
label (``jaxmp.training.data.IGNORE``) with 0, so the loss and its gradients are the mean over the valid
labels of the whole batch, whatever the micro-batching, mesh and schedule: the weights are computed once
from the global batch, before it is split, and each micro-batch adds its weighted sum.

Why one place: every other module (trainer loop, benchmarks, tests, notebooks) gets a ``Program`` whose
functions are already compiled for one mesh, strategy and batch shape. Parameters are born sharded
(``eval_shape`` -> shardings -> ``jit(init, out_shardings=...)``), the batch is sharded through
``in_shardings`` and the train state is donated, so a step never holds two copies of the weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxmp.config import Config, ConfigError, OptimConfig, first_line, validate
from jaxmp.models import build_model, check_context, check_mesh, check_preset
from jaxmp.models.contract import (
    ModelParts,
    apply_model,
    build_own_model,
    check_model_fn,
    function_label,
    model_parts,
    user_frame,
)
from jaxmp.models.layers import LayerContext
from jaxmp.parallel.mesh import PIPE, as_mesh
from jaxmp.parallel.rules import (
    as_axes,
    logical_to_spec,
    rules_for,
    rules_without_axes,
    sequence_parallel,
    use_rules,
)
from jaxmp.parallel.sharding import axis_size, check_divisible, fsdp_specs, param_specs
from jaxmp.pipeline import Checks, Pipeline, build_pipeline, execute, is_pipelined, split_microbatches
from jaxmp.pipeline.stage_collectives import check_stage_collectives
from jaxmp.speech import speaks_python


class TrainState(NamedTuple):
    """Everything a step reads and writes: params, optimizer state, step counter and dropout key."""

    params: dict  # nnx.to_pure_dict: nested dicts of arrays, no Variable pytree nodes
    opt_state: optax.OptState
    step: jax.Array
    key: jax.Array


class Program(NamedTuple):
    """Compiled functions and shardings for one model, mesh, strategy and batch shape."""

    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    state_shardings: TrainState
    x_sharding: NamedSharding
    y_sharding: NamedSharding
    init: Callable[[], TrainState]
    train_step: Any
    eval_step: Any
    grad_step: Any  # (state, x, y) -> (loss, grads in the model's layer order): what a step would apply
    state_abstract: TrainState | None = None  # shapes, dtypes and shardings of the state, without compiling
    saved_abstract: TrainState | None = None  # the same for the saved form (parameters in layer order)
    to_saved: Any = None  # state -> saved form (pipelined: the stage buffers unpacked into layer order)
    from_saved: Any = None  # saved form -> state
    pipeline: Any = None  # the pipeline's plans and packing (jaxmp.pipeline.Pipeline), when pipelined
    model: Any = None  # the model as shapes (nnx.eval_shape): its layers and parameter names, for inspection
    rules: Mapping | None = None  # the whole rules table the program was built with
    batch: tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct] | None = None  # one global batch (x, y) as shapes

    @speaks_python
    def put_batch(self, x, y) -> tuple[jax.Array, jax.Array]:
        """Place a host batch on the mesh with the shardings the compiled steps expect.

        Raises:
          ConfigError: ``x`` or ``y`` is not of the shape and dtype kind the program was built for.
        """
        if self.batch is not None:
            for name, value, want in zip(("x", "y"), (x, y), self.batch, strict=True):
                check_batch_array(name, value, want)
        return put_global(x, self.x_sharding), put_global(y, self.y_sharding)

    def put_rows(self, x_all, y_all, rows) -> tuple[jax.Array, jax.Array]:
        """The batch made of examples ``rows`` of host arrays; each process reads only the rows it holds."""
        return put_rows(x_all, rows, self.x_sharding), put_rows(y_all, rows, self.y_sharding)


def check_batch_array(name: str, value, want: jax.ShapeDtypeStruct) -> None:
    """``value`` must have ``want``'s shape and dtype kind (floats for floats, integers for integers)."""
    import numpy as np

    shape = tuple(np.shape(value))
    dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
    same_kind = jnp.issubdtype(dtype, jnp.floating) == jnp.issubdtype(want.dtype, jnp.floating)
    if shape != tuple(want.shape) or not same_kind or jnp.issubdtype(dtype, jnp.complexfloating):
        raise ConfigError(
            f"put_batch: {name} is {dtype}{list(shape)}, the program was built for {jnp.dtype(want.dtype)}"
            f"{list(want.shape)} (batch_size {want.shape[0]}; input_dtype= and label_shape= of build_program)."
        )


def put_global(a, sharding: NamedSharding) -> jax.Array:
    """A host array (the same on every process) as a global array with ``sharding``.

    One process: ``device_put``. Several: each process builds only the shards of its own devices, so
    the result is one global array without any cross-host transfer.
    """
    if jax.process_count() == 1:
        return jax.device_put(a, sharding)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def put_rows(source, rows, sharding: NamedSharding) -> jax.Array:
    """``source[rows]`` as a global array, gathering on each process only the rows its devices hold.

    Why: with many hosts, no process should copy the whole global batch; ``make_array_from_callback``
    asks each process only for the slices of its addressable devices.
    """
    if jax.process_count() == 1:
        return jax.device_put(source[rows], sharding)
    shape = (len(rows), *source.shape[1:])

    def shard(index: tuple[slice, ...]):
        return source[rows[index[0]]][(slice(None), *index[1:])]

    return jax.make_array_from_callback(shape, sharding, shard)


# --optimizer: name -> the optax transformation of the run's learning rate and weight decay.
OPTIMIZERS: dict[str, Callable[[OptimConfig], optax.GradientTransformation]] = {
    "sgd": lambda cfg: optax.sgd(cfg.lr),
    "adam": lambda cfg: optax.adam(cfg.lr),
    "adamw": lambda cfg: optax.adamw(cfg.lr, weight_decay=cfg.weight_decay),
}


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """The optax transformation named by ``cfg.optimizer``."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"--optimizer {cfg.optimizer!r} is not one of {', '.join(OPTIMIZERS)}.")
    return OPTIMIZERS[cfg.optimizer](cfg)


def cross_entropy(logits_BxC: jax.Array, y_B: jax.Array) -> jax.Array:
    """Cross-entropy of integer labels, one per label (log-softmax outputs are accepted as logits).

    Vocab-parallel (Megatron's ``vocab_parallel_cross_entropy``): the target's logit is picked by a
    comparison with the class index, not a gather, so logits split over their last axis (an LM head
    split by vocabulary over ``tensor``) are never gathered: each device reduces its own slice, and XLA
    adds the max, the sum of exponentials and the target's logit over ``tensor``: three numbers per
    token instead of ``V / t`` logits.
    """
    logits = logits_BxC.astype(jnp.float32)
    top = jax.lax.stop_gradient(logits.max(-1, keepdims=True))
    shifted = logits - top
    log_sum = jnp.log(jnp.exp(shifted).sum(-1))
    classes = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    target = jnp.where(classes == y_B[..., None], shifted, 0.0).sum(-1)
    return log_sum - target


LossFn = Callable[[jax.Array, jax.Array], jax.Array]  # (outputs [B, ...], labels [B, ...]) -> loss per label


def label_weights(y: jax.Array) -> jax.Array:
    """``1 / (valid labels of the global batch)`` per valid label, 0 per ignored (negative) one: the
    weights whose weighted sum is the mean over valid labels, however the batch is split later."""
    valid = (y >= 0).astype(jnp.float32)
    return valid / jnp.maximum(valid.sum(), 1.0)


class Heads(NamedTuple):
    """What the last layer's outputs feed: the weighted train loss, and the eval sums."""

    train: Callable  # (outputs, labels, weights) -> {"loss"}: label_weights give the mean
    eval: Callable  # (outputs, labels, mask) -> {"loss_sum", "correct", "count"} over the labels mask counts


def heads(loss: LossFn = cross_entropy) -> Heads:
    """The train and eval heads of a per-label ``loss``; accuracy is the arg-max over the last axis.
    Ignored (negative) labels reach ``loss`` as 0 and count with weight 0."""

    def train(outputs, labels, weights) -> dict:
        return {"loss": (loss(outputs, jnp.maximum(labels, 0)).astype(jnp.float32) * weights).sum()}

    def evaluate(outputs, labels, mask) -> dict:
        counted = mask * (labels >= 0).astype(mask.dtype)
        correct = (jnp.argmax(outputs, -1) == labels).astype(jnp.float32)
        losses = loss(outputs, jnp.maximum(labels, 0)).astype(jnp.float32)
        return {"loss_sum": (losses * counted).sum(), "correct": (correct * counted).sum(), "count": counted.sum()}

    return Heads(train, evaluate)


def check_loss(loss, outputs: jax.ShapeDtypeStruct, labels: jax.ShapeDtypeStruct) -> None:
    """``loss`` maps the model's outputs and labels to one float loss per label (``ConfigError``)."""
    if not callable(loss):
        raise ConfigError(f"loss must be a function (outputs, labels) -> losses per label, got {type(loss).__name__}.")
    try:
        out = jax.eval_shape(loss, outputs, labels)
    except Exception as error:  # the user's function, traced on shapes: say what it was given
        message = f"loss failed on outputs {outputs.shape} and labels {labels.shape}: {first_line(error)}"
        raise ConfigError(message) from error
    if getattr(out, "shape", None) != labels.shape or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ConfigError(
            f"loss must give one float per label, shape {labels.shape}; it gave {getattr(out, 'shape', out)} "
            f"{getattr(out, 'dtype', '')} for outputs {outputs.shape}."
        )


def check_optimizer(tx) -> None:
    if not isinstance(tx, optax.GradientTransformation):
        raise ConfigError(f"optimizer must be an optax.GradientTransformation, got {type(tx).__name__}.")


def _batch_spec(names: tuple[str, ...], ndim: int, rules) -> PartitionSpec:
    return logical_to_spec(names + (None,) * (ndim - 1), rules)


def _check_batch(batch_size: int, spec: PartitionSpec, mesh: jax.sharding.Mesh) -> int:
    """Raise ``ConfigError`` if the batch does not divide its mesh axes; return how many it spans."""
    axes = spec[0] if spec else None
    parts = axis_size(mesh, axes)
    if batch_size % parts:
        named_axes = "x".join((axes,) if isinstance(axes, str) else axes)
        raise ConfigError(
            f"--batch-size {batch_size} is not divisible by {parts}, the devices of mesh axes "
            f"{named_axes} that split the batch."
        )
    return parts


def _full_tree_shardings(specs, mesh):
    """A tree shaped like the (pure-dict) params with a NamedSharding per array."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


class _Layout(NamedTuple):
    """Shardings of the train state and of a batch, derived from the rules table."""

    graphdef: nnx.GraphDef
    parts: ModelParts
    state: TrainState
    x: NamedSharding
    y: NamedSharding
    layer_params: Any  # NamedSharding per parameter in the model's own layer order (the saved form)
    pipeline: Pipeline | None  # the pipeline's plans and packing, when pipelined
    outputs: jax.ShapeDtypeStruct  # the model's outputs for one global batch
    model: nnx.Module  # the model as shapes


class BatchShape(NamedTuple):
    """One example's inputs and labels: shape and dtype of ``x``, shape of ``y`` (int32)."""

    input_shape: tuple[int, ...]
    input_dtype: Any = jnp.float32
    label_shape: tuple[int, ...] = ()

    def x(self, batch: int, sharding=None) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((batch, *self.input_shape), self.input_dtype, sharding=sharding)

    def y(self, batch: int, dtype=jnp.int32, sharding=None) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((batch, *self.label_shape), dtype, sharding=sharding)


def _layout(cfg: Config, mesh, rules, tx, make_model, shapes: BatchShape) -> _Layout:
    """Param shardings from logical names (packed per stage when pipelined), optimizer shardings
    following them, batch shardings."""
    abstract_model = nnx.eval_shape(lambda: _construct(make_model, 0))
    parts = model_parts(abstract_model)
    x_struct = shapes.x(cfg.run.batch_size)
    try:  # before the pipeline cuts the model: one line for layers that do not fit together, on any mesh
        outputs = jax.eval_shape(
            lambda p, x: apply_model(parts, p, x, LayerContext()),
            nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param)),
            x_struct,
        )
    except ConfigError:
        raise
    except Exception as error:  # the user's layers, traced on shapes: one line saying so
        where = user_frame(error)
        raise ConfigError(f"the model fails on inputs of shape {x_struct.shape}{where}: {first_line(error)}") from error
    graphdef, abstract_state = nnx.split(abstract_model, nnx.Param)
    input_axis = getattr(type(abstract_model), "INPUT_BATCH_AXIS", "batch")
    x_spec = _batch_spec((input_axis,), 1 + len(shapes.input_shape), rules)
    y_spec = _batch_spec(("batch",), 1 + len(shapes.label_shape), rules)
    _check_batch(cfg.run.batch_size, x_spec, mesh)
    _check_batch(cfg.run.batch_size, y_spec, mesh)
    pipelined = is_pipelined(cfg.pipeline, mesh.shape[PIPE])
    param_rules = rules_without_axes(rules, {PIPE}) if pipelined else rules
    specs = param_specs(abstract_state, param_rules)
    if cfg.model.fsdp:
        specs = fsdp_specs(abstract_state, specs, mesh, rules)
    check_divisible(abstract_state, specs, mesh)
    specs = nnx.to_pure_dict(specs)
    layer_params_sh = _full_tree_shardings(specs, mesh)
    pipeline = None
    params_sh = layer_params_sh
    if pipelined:
        axes = tuple(dict.fromkeys(a for spec in (x_spec, y_spec) for a in as_axes(spec[0]) if mesh.shape[a] > 1))
        with jax.set_mesh(mesh), use_rules(rules):
            boundary_names = getattr(type(abstract_model), "BOUNDARY_NAMES", None)
            pipeline = build_pipeline(
                cfg.pipeline, parts, nnx.to_pure_dict(abstract_state), specs, mesh, x_struct, axes, boundary_names
            )
        params_sh = _full_tree_shardings(pipeline.packing.buffer_specs(), mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_params = pipeline.packing.abstract_buffers() if pipeline else nnx.to_pure_dict(abstract_state)
    opt_sh = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        jax.eval_shape(tx.init, abstract_params),
        params_sh,
        transform_non_params=lambda _: replicated,
    )
    state_sh = TrainState(params_sh, opt_sh, replicated, replicated)
    x_sh, y_sh = NamedSharding(mesh, x_spec), NamedSharding(mesh, y_spec)
    return _Layout(graphdef, parts, state_sh, x_sh, y_sh, layer_params_sh, pipeline, outputs, abstract_model)


@speaks_python
def build_program(
    cfg: Config,
    mesh: jax.sharding.Mesh,
    input_shape: tuple[int, ...],
    classes: int,
    *,
    model_fn: Callable[[nnx.Rngs], nnx.Module] | None = None,
    optimizer: optax.GradientTransformation | None = None,
    loss: LossFn | None = None,
    rules: Mapping[str, Any] | None = None,
    input_dtype: Any = jnp.float32,
    label_shape: tuple[int, ...] = (),
    poison: bool = False,
    masked: bool = True,
) -> Program:
    """Build, shard and compile the init, train and eval functions of ``cfg`` on ``mesh``.

    Args:
      model_fn: ``rngs -> model`` for a model of your own (the layer-list contract of
        ``jaxmp.models.contract``); default: the preset ``cfg.model``.
      optimizer: any optax ``GradientTransformation`` (schedules, chains, clipping); default: the
        one ``cfg.optim`` names.
      loss: ``(outputs, labels) -> loss per label``, shape of the labels; default: cross-entropy of
        integer labels (vocab-parallel: :func:`cross_entropy`).
      rules: logical axis name -> mesh axes, added to (or replacing entries of) the rules table of
        ``cfg.model.strategy``, e.g. ``{"hidden": "tensor"}``; every logical name a parameter uses
        needs a rule (``None`` keeps it whole).
      input_dtype: the examples' dtype (``int32`` for token ids); float inputs are float32.
      label_shape: one example's labels: ``()`` for one class per example, ``(T,)`` for one per token.
      poison: start the pipeline's stash and messages as NaN (tests prove they never reach the result).
      masked: tests only: ``False`` writes every pipeline message, needed or not (the poison must show).

    Raises:
      ConfigError: the model breaks the layer-list contract, a parameter dimension or the batch does not
        divide the mesh axes it is split over, or the model cannot be pipelined as asked; or any option
        is invalid (``jaxmp.config.validate``, the CLI's checks).
    """
    validate(cfg)
    mesh = as_mesh(mesh)
    rules = rules_for(cfg.model.strategy, rules)
    if cfg.model.sequence_parallel:
        rules = sequence_parallel(rules)
    tx = make_optimizer(cfg.optim) if optimizer is None else optimizer
    check_optimizer(tx)
    if model_fn is None:
        check_preset(cfg.model)
        check_mesh(cfg.model, mesh, rules, tuple(input_shape))

        def model_fn(rngs):
            return build_model(cfg.model, input_shape, classes, rngs)

    else:
        label = cfg.model.model_fn or function_label(model_fn)
        check_context(mesh, f"the model {label}", has_sequence=False)
        check_model_fn(model_fn, label)
        model_fn = functools.partial(build_own_model, model_fn, label)

    shapes = BatchShape(tuple(input_shape), jnp.dtype(input_dtype), tuple(label_shape))
    layout = _layout(cfg, mesh, rules, tx, model_fn, shapes)
    to_state = layout.pipeline.packing.pack if layout.pipeline else (lambda params: params)

    def init_fn() -> TrainState:
        model = _construct(model_fn, cfg.run.seed)
        params = to_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))  # plain dicts: fast flattening per call
        return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), jax.random.key(cfg.run.seed + 1))

    if loss is not None:
        check_loss(loss, layout.outputs, shapes.y(cfg.run.batch_size))
    elif layout.outputs.shape[-1] < classes:
        raise ConfigError(
            f"the model gives {layout.outputs.shape[-1]} outputs per label, fewer than the {classes} classes of the "
            "data: cross-entropy needs one logit per class."
        )
    loss_and_grad, evaluate = _objectives(layout, heads(loss or cross_entropy), Checks(poison, masked))

    def grad_step(state: TrainState, x, y):
        key = jax.random.fold_in(state.key, state.step)
        return loss_and_grad(state.params, x, y, key)

    def layer_grad_step(state: TrainState, x, y):
        loss, grads = grad_step(state, x, y)
        return loss, layout.pipeline.packing.unpack(grads) if layout.pipeline else grads

    def train_step(state: TrainState, x, y):
        loss, grads = grad_step(state, x, y)
        with jax.numpy_dtype_promotion("standard"):  # optax relies on implicit promotion (b1 ** count)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if layout.pipeline is not None:
            params = layout.pipeline.packing.sync_tied(params)  # a tied parameter's uses read its new value
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}  # finite both => params stay finite
        return TrainState(params, opt_state, state.step + 1, state.key), metrics

    steps = _Steps(init_fn, train_step, layer_grad_step, evaluate)
    return _compile_program(mesh, rules, layout, steps, cfg.run.batch_size, shapes, tx)


def _construct(model_fn: Callable[[nnx.Rngs], nnx.Module], seed: int) -> nnx.Module:
    """The model, with Flax's eager sharding off: logical names are the rules table's business, and the
    parameters are placed by the init step's ``out_shardings`` (born sharded)."""
    with nnx.use_eager_sharding(False):
        return model_fn(nnx.Rngs(params=seed))


def _objectives(layout: _Layout, head: Heads, checks: Checks):
    """``(params, x, y, key) -> (loss, grads)`` and ``(params, x, y, mask) -> sums``, plain or pipelined."""
    pipeline = layout.pipeline
    in_order = _sequence_order(layout.model)
    if pipeline is None:

        def loss_fn(params, x, y, key):
            x, y = in_order(x, y)
            ctx = LayerContext(True, key, jnp.arange(x.shape[0]))
            logits = apply_model(layout.parts, params, x, ctx)
            return head.train(logits, y, label_weights(y))["loss"]

        def evaluate(params, x, y, mask):
            x, y, mask = in_order(x, y, mask)
            return head.eval(apply_model(layout.parts, params, x, LayerContext()), y, mask)

        return jax.value_and_grad(loss_fn), evaluate
    microbatches = pipeline.train.schedule.microbatches

    def loss_and_grad(params, x, y, key):
        x, y = in_order(x, y)
        data = [split_microbatches(a, microbatches) for a in (x, y, label_weights(y))]
        sums, grads = execute(pipeline.train, params, *data, key, head.train, train=True, checks=checks)
        return sums["loss"], pipeline.packing.fold_tied_grads(grads)

    def evaluate(params, x, y, mask):
        data = [split_microbatches(a, pipeline.eval.schedule.microbatches) for a in in_order(x, y, mask)]
        return execute(pipeline.eval, params, *data, jax.random.key(0), head.eval, train=False, checks=checks)

    return loss_and_grad, evaluate


def _sequence_order(model: nnx.Module) -> Callable[..., tuple]:
    """``(x, y, ...) -> (x, y, ...)`` with the tokens in the order the model's layers hold them: a
    permutation of axis 1 when a split sequence is balanced (``GPT.sequence_order``), else unchanged.
    Called while the step is traced: the order depends on the mesh and rules in force."""
    order_of = getattr(model, "sequence_order", None)

    def in_order(*arrays):
        order_T = order_of(arrays[0].shape[1]) if order_of is not None and arrays[0].ndim > 1 else None
        return arrays if order_T is None else tuple(a[:, order_T] for a in arrays)

    return in_order


class _Steps(NamedTuple):
    init: Callable
    train: Callable
    grad: Callable
    eval: Callable


def _compile_program(mesh, rules, layout: _Layout, steps: _Steps, batch, shapes: BatchShape, tx) -> Program:
    """Every step function, lowered and compiled ahead of time on first use (``.compiled`` forces it)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    state_sh = layout.state

    x_abs = shapes.x(batch, layout.x)
    y_abs = shapes.y(batch, sharding=layout.y)
    state_abs = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), jax.eval_shape(steps.init), state_sh
    )
    compile_here = _compiler(mesh, rules, check=layout.pipeline is not None)
    init = _LazyCompiled(lambda: compile_here(jax.jit(steps.init, out_shardings=state_sh)))
    train = _LazyCompiled(
        lambda: compile_here(
            jax.jit(
                steps.train,
                in_shardings=(state_sh, layout.x, layout.y),
                out_shardings=(state_sh, replicated),
                donate_argnums=0,
            ),
            state_abs,
            x_abs,
            y_abs,
        )
    )
    evaluate = _LazyCompiled(
        lambda: compile_here(
            jax.jit(
                steps.eval,
                in_shardings=(state_sh.params, layout.x, layout.y, layout.y),
                out_shardings=replicated,
            ),
            state_abs.params,
            x_abs,
            y_abs,
            shapes.y(batch, jnp.float32, layout.y),
        )
    )
    grad = _LazyCompiled(
        lambda: compile_here(
            jax.jit(
                steps.grad,
                in_shardings=(state_sh, layout.x, layout.y),
                out_shardings=(replicated, layout.layer_params),
            ),
            state_abs,
            x_abs,
            y_abs,
        )
    )
    saved_abs, to_saved, from_saved = _saved_form(layout, tx, state_abs, compile_here)
    return Program(
        mesh=mesh,
        graphdef=layout.graphdef,
        state_shardings=state_sh,
        x_sharding=layout.x,
        y_sharding=layout.y,
        init=init,
        train_step=train,
        eval_step=evaluate,
        grad_step=grad,
        state_abstract=state_abs,
        saved_abstract=saved_abs,
        to_saved=to_saved,
        from_saved=from_saved,
        pipeline=layout.pipeline,
        model=layout.model,
        rules=rules,
        batch=(shapes.x(batch), shapes.y(batch)),
    )


def _saved_form(layout: _Layout, tx, state_abs: TrainState, compile_here):
    """The state as checkpoints hold it (parameters and optimizer moments in the model's own layer
    order, whatever the split, placement or mesh) and the two conversions."""
    if layout.pipeline is None:
        return state_abs, (lambda state: state), (lambda state: state)
    packing = layout.pipeline.packing
    packed_def = jax.tree.structure(state_abs.params)
    layer_def = jax.tree.structure(layout.layer_params)
    replicated = NamedSharding(layout.x.mesh, PartitionSpec())

    def convert(state: TrainState, fn, tree_def) -> TrainState:
        def is_params(node) -> bool:
            return jax.tree.structure(node) == tree_def

        opt_state = jax.tree.map(lambda node: fn(node) if is_params(node) else node, state.opt_state, is_leaf=is_params)
        return TrainState(fn(state.params), opt_state, state.step, state.key)

    def unpack(state):
        return convert(state, packing.unpack, packed_def)

    def pack(state):
        return convert(state, packing.pack, layer_def)

    saved_params = jax.eval_shape(packing.unpack, state_abs.params)
    saved_opt = jax.eval_shape(tx.init, saved_params)
    opt_sh = optax.tree_map_params(
        tx, lambda _, sharding: sharding, saved_opt, layout.layer_params, transform_non_params=lambda _: replicated
    )
    saved_sh = TrainState(layout.layer_params, opt_sh, replicated, replicated)
    saved_abs = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
        TrainState(saved_params, saved_opt, state_abs.step, state_abs.key),
        saved_sh,
    )
    to_saved = _LazyCompiled(lambda: compile_here(jax.jit(unpack, out_shardings=saved_sh), state_abs))
    from_saved = _LazyCompiled(lambda: compile_here(jax.jit(pack, out_shardings=layout.state), saved_abs))
    return saved_abs, to_saved, from_saved


def _compiler(mesh: jax.sharding.Mesh, rules, *, check: bool = False):
    """Lower and compile a jitted function ahead of time, with the mesh and rules in force while tracing;
    ``check``: refuse a pipelined program with a collective that would hang inside a stage
    (:mod:`jaxmp.pipeline.stage_collectives`)."""

    def compile_here(jitted, *abstract_args):
        with jax.set_mesh(mesh), use_rules(rules):
            compiled = jitted.lower(*abstract_args).compile()
        return check_stage_collectives(compiled, mesh) if check else compiled

    return compile_here


class _LazyCompiled:
    """Compile on first use: not every user of a Program needs every function (tests, benchmarks)."""

    def __init__(self, make: Callable[[], Any]):
        self._make, self._compiled = make, None

    @property
    def compiled(self) -> jax.stages.Compiled:
        if self._compiled is None:
            self._compiled = self._make()
        return self._compiled

    def __call__(self, *args):
        return self.compiled(*args)
