"""The train step: loss, ``value_and_grad``, optax update — the one place where jit, shardings and
donation live.

Shapes: B = global batch, C = classes; ``x`` is ``[B, ...]`` (images NHWC or features), ``y`` is ``[B]``.

Why one place: every other module (trainer loop, benchmarks, tests, notebooks) gets a ``Program`` whose
functions are already compiled for one mesh, strategy and batch shape. Parameters are born sharded
(``eval_shape`` -> shardings -> ``jit(init, out_shardings=...)``), the batch is sharded through
``in_shardings`` and the train state is donated, so a step never holds two copies of the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxmp.config import Config, ConfigError, OptimConfig
from jaxmp.models import build_model
from jaxmp.pipeline import check_pipeline, make_forward
from jaxmp.sharding import (
    axis_size,
    check_divisible,
    fsdp_specs,
    logical_to_spec,
    param_specs,
    rules_for,
    use_rules,
)


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
    grad_step: Any  # (state, x, y) -> (loss, grads): what a train step would apply, for checks
    state_abstract: TrainState | None = None  # shapes, dtypes and shardings of the state, without compiling

    def put_batch(self, x, y) -> tuple[jax.Array, jax.Array]:
        """Place a host batch on the mesh with the shardings the compiled steps expect."""
        return put_global(x, self.x_sharding), put_global(y, self.y_sharding)

    def put_rows(self, x_all, y_all, rows) -> tuple[jax.Array, jax.Array]:
        """The batch made of examples ``rows`` of host arrays; each process reads only the rows it holds."""
        return put_rows(x_all, rows, self.x_sharding), put_rows(y_all, rows, self.y_sharding)


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


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """The optax transformation named by ``cfg.optimizer``."""
    if cfg.optimizer == "sgd":
        return optax.sgd(cfg.lr)
    if cfg.optimizer == "adam":
        return optax.adam(cfg.lr)
    if cfg.optimizer == "adamw":
        return optax.adamw(cfg.lr, weight_decay=cfg.weight_decay)
    raise ConfigError(f"--optimizer {cfg.optimizer!r} is not one of sgd, adam, adamw.")


def cross_entropy(logits_BxC: jax.Array, y_B: jax.Array) -> jax.Array:
    """Per-example cross-entropy of integer labels (log-softmax outputs are accepted as logits)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxC.astype(jnp.float32), y_B)


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
    state: TrainState
    x: NamedSharding
    y: NamedSharding


def _layout(cfg: Config, mesh, rules, tx, init_fn, input_shape, classes) -> _Layout:
    """Param shardings from logical names, optimizer shardings following them, batch shardings."""
    abstract_model = nnx.eval_shape(lambda: build_model(cfg.model, input_shape, classes, nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    input_axis = getattr(type(abstract_model), "INPUT_BATCH_AXIS", "batch")
    x_spec = _batch_spec((input_axis,), 1 + len(input_shape), rules)
    y_spec = _batch_spec(("batch",), 1, rules)
    _check_batch(cfg.run.batch_size, x_spec, mesh)
    parts = _check_batch(cfg.run.batch_size, y_spec, mesh)
    check_pipeline(cfg.pipeline, abstract_model, mesh, cfg.run.batch_size, parts)
    specs = param_specs(abstract_params, rules)
    if cfg.model.fsdp:
        specs = fsdp_specs(abstract_params, specs, mesh, rules)
    check_divisible(abstract_params, specs, mesh)
    specs = nnx.to_pure_dict(specs)
    replicated = NamedSharding(mesh, PartitionSpec())
    params_sh = _full_tree_shardings(specs, mesh)
    opt_sh = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        jax.eval_shape(init_fn).opt_state,
        params_sh,
        transform_non_params=lambda _: replicated,
    )
    state_sh = TrainState(params_sh, opt_sh, replicated, replicated)
    return _Layout(graphdef, state_sh, NamedSharding(mesh, x_spec), NamedSharding(mesh, y_spec))


def build_program(
    cfg: Config, mesh: jax.sharding.Mesh, input_shape: tuple[int, ...], classes: int, *, poison: bool = False
) -> Program:
    """Build, shard and compile the init, train and eval functions of ``cfg`` on ``mesh``.

    Args:
      poison: fill pipeline bubbles with NaN (tests prove they never reach the result).

    Raises:
      ConfigError: a parameter dimension or the batch does not divide the mesh axes it is split over,
        or the model cannot be pipelined as asked.
    """
    rules = rules_for(cfg.model.strategy)
    tx = make_optimizer(cfg.optim)
    forward = make_forward(cfg.pipeline, mesh.shape["pipe"], poison=poison)

    def init_fn() -> TrainState:
        model = build_model(cfg.model, input_shape, classes, nnx.Rngs(params=cfg.run.seed))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))  # plain dicts: fast pytree flattening per call
        return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), jax.random.key(cfg.run.seed + 1))

    layout = _layout(cfg, mesh, rules, tx, init_fn, input_shape, classes)

    def loss_fn(params, x, y, key):
        logits = forward(nnx.merge(layout.graphdef, params), x, train=True, key=key)
        return cross_entropy(logits, y).mean()

    def grad_step(state: TrainState, x, y):
        key = jax.random.fold_in(state.key, state.step)
        return jax.value_and_grad(loss_fn)(state.params, x, y, key)

    def train_step(state: TrainState, x, y):
        loss, grads = grad_step(state, x, y)
        with jax.numpy_dtype_promotion("standard"):  # optax relies on implicit promotion (b1 ** count)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}  # finite both => params stay finite
        return TrainState(params, opt_state, state.step + 1, state.key), metrics

    def eval_step(params, x, y, mask):
        logits = forward(nnx.merge(layout.graphdef, params), x, train=False)
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        return {"loss_sum": (cross_entropy(logits, y) * mask).sum(), "correct": (correct * mask).sum()}

    steps = _Steps(init_fn, train_step, grad_step, eval_step)
    return _compile_program(mesh, rules, layout, steps, cfg.run.batch_size, input_shape)


class _Steps(NamedTuple):
    init: Callable
    train: Callable
    grad: Callable
    eval: Callable


def _compile_program(mesh, rules, layout: _Layout, steps: _Steps, batch, input_shape) -> Program:
    """Every step function, lowered and compiled ahead of time on first use (``.compiled`` forces it)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    state_sh = layout.state

    def struct(shape, dtype, sharding):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    x_abs = struct((batch, *input_shape), jnp.float32, layout.x)
    y_abs = struct((batch,), jnp.int32, layout.y)
    state_abs = jax.tree.map(lambda a, s: struct(a.shape, a.dtype, s), jax.eval_shape(steps.init), state_sh)
    compile_here = _compiler(mesh, rules)
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
            struct((batch,), jnp.float32, layout.y),
        )
    )
    grad = _LazyCompiled(
        lambda: compile_here(
            jax.jit(
                steps.grad, in_shardings=(state_sh, layout.x, layout.y), out_shardings=(replicated, state_sh.params)
            ),
            state_abs,
            x_abs,
            y_abs,
        )
    )
    return Program(mesh, layout.graphdef, state_sh, layout.x, layout.y, init, train, evaluate, grad, state_abs)


def _compiler(mesh: jax.sharding.Mesh, rules):
    """Lower and compile a jitted function ahead of time, with the mesh and rules in force while tracing."""

    def compile_here(jitted, *abstract_args):
        with jax.set_mesh(mesh), use_rules(rules):
            return jitted.lower(*abstract_args).compile()

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
