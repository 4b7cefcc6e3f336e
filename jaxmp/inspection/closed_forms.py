"""Closed-form communication of a train step: what the textbooks say each strategy exchanges.

Shapes: B = global batch, b = rows one data replica (or one micro-batch) sees, D = residual width,
A = the widest activation between two pipeline chunks (one example, flattened),
F = flattened features, t = devices on ``tensor``, S = stages, M = micro-batches, R = repeats,
T = the schedule's ticks (GPipe and 1F1B: ``2*(M*R + S - 1)`` when S divides M), L = layers.

Per device and per step, in elements (the counting conventions of :mod:`jaxmp.inspection.collectives`):

- data parallelism (Dettmers; Scaling Book): every gradient is all-reduced once over the mesh axes
  that split the batch where its layer runs and that its own sharding does not use: the parameter's
  elements per device. Conv layers use the ``conv_batch`` axes, dense layers ``batch``. Scalars (the
  mean loss, metrics such as the gradient norm) are not predicted: :func:`jaxmp.inspection.step_report.compare` counts
  them apart.
- tensor parallelism, per dense layer with b rows (Megatron-LM sec. 3):
  column (output split): forward all-gather ``b*fan_out*(t-1)/t`` unless a row layer follows
  (a Megatron pair keeps the hidden activation split), backward all-reduce ``b*fan_in`` of the partial
  input gradient unless it is the network's first layer (inputs need no gradient);
  row (input split): forward all-reduce ``b*fan_out``; backward all-gather ``b*fan_in*(t-1)/t``
  unless a column layer precedes it (pair) or it is first. A residual Megatron block therefore costs
  ``2*b*D``. ``hybrid`` adds the all-gather of the flattened conv features from the conv batch split
  to the dense one: ``b*F*(g-1)/g`` over the extra axes (Krizhevsky 2014).
- pipeline (any schedule table as one SPMD program, :mod:`jaxmp.pipeline.engine`): each tick of the
  table's loops is one collective-permute that moves one micro-batch activation or cotangent ``b*A``
  per device (an activation one stage on, or a cotangent one stage back, whichever the device's action
  sends): ``T*b*A`` for GPipe, 1F1B and ZB-H1 (``T`` their ticks), more where a table has a stage
  hear from two others in one tick (a second round). The textbook's minimum is ``b*D`` per boundary
  per micro-batch each way (the extra ticks are the bubble's share). The bubble is
  ``(S-1)/(M*R+S-1)`` of the stage-ticks (ZB-H1: ``(S-1)/(3M+S-1)``). No weight or gradient crosses ``pipe``; the
  gradients of each stage's buffers are summed over the batch axes once per step. Tensor-parallel
  layers inside stages run in per-stage branches, whose collectives the loop counts of the compiled
  program cannot attribute to ticks, so pipelined runs leave ``tensor`` uncovered.

- a transformer (``gpt``; Narayanan et al. 2021, sec. 3.2): per block, attention and MLP are each a
  Megatron pair, ``2*b*T*D`` forward and backward: ``4*L*b*T*D``; the vocab-split embedding adds its
  masked lookup ``b*T*D`` forward, the vocab-split head its input gradient ``b*T*D`` backward and the
  vocab-parallel loss ``3*b*T`` (max, sum of exponentials, target logit). With a ``context`` axis
  every token term is per device: ``T/C`` tokens in place of ``T``.
- context parallelism (C devices on ``context``; per layer, with ``Tc = T/C`` tokens and ``h`` heads of
  width ``K`` per device, ``E = b*Tc*h*K`` one device's keys, or values): ``all-gather`` gathers K and V,
  ``2*E*(C-1)`` forward, and sums their gradients back, an all-reduce of ``2*C*E`` (XLA:CPU emits an
  all-reduce and a slice; a reduce-scatter would move ``(C-1)/C`` of it); ``ring`` passes K and V on
  ``C-1`` times forward, ``2*E*(C-1)`` (each device receives ``(C-1)/C`` of the layer's K and V), and
  K, V, dK and dV ``C-1`` times backward plus dK and dV once more to come home, ``2*E*(2C-1)`` (a
  block's positions are looked up, not sent); ``ulysses`` turns Q, K, V and the output from a sequence
  split into a head split and back, 4 all-to-alls forward and 4 backward, ``8*E*(C-1)/C``. Weight
  gradients are summed over ``context`` as over ``data`` (each device saw other tokens).

The tensor terms follow the layer kinds (:data:`DENSE_MAPS`: jaxmp's ``Dense``, ``Embed`` and
``MegatronBlock``; :data:`LAYER_TERMS`: the transformer's), so a model of your own built from them has
closed forms too. Where a model has none
(a layer kind jaxmp does not know, convolutions split by channel, tensor parallelism inside pipeline
stages), the axis is listed in ``Prediction.uncovered`` and only measured numbers are shown.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
from flax import nnx

from jaxmp.config import Config
from jaxmp.models.contract import model_parts
from jaxmp.models.gpt import Block, LMHead, TokenEmbedding
from jaxmp.models.mlp import Dense, Embed, MegatronBlock
from jaxmp.parallel.mesh import CONTEXT, PIPE, TENSOR
from jaxmp.parallel.rules import rules_without_axes
from jaxmp.parallel.sharding import axis_size, param_specs, path_name
from jaxmp.pipeline import is_pipelined
from jaxmp.pipeline.plan import executor_transfers


class Expected(NamedTuple):
    """One closed-form term: ``elements`` moved per device per step by ``kind`` over ``axes``."""

    term: str
    kind: str
    axes: tuple[str, ...]
    elements: int
    formula: str


class Prediction(NamedTuple):
    """The closed-form terms of one train step, and the axes they do not cover."""

    terms: list[Expected]
    uncovered: tuple[str, ...]
    bubble: float  # fraction of idle stage-ticks; 0 without a pipeline


class _Dense(NamedTuple):
    name: str
    fan_in: int
    fan_out: int
    col: bool  # output split over tensor
    row: bool  # input split over tensor
    first: bool


class _Context(NamedTuple):
    cfg: Config
    mesh: jax.sharding.Mesh
    rules: dict
    model: nnx.Module
    params: dict  # path name -> (global shape, spec, logical names)
    pipeline: object = None  # jaxmp.pipeline.Pipeline of a pipelined program
    ties: tuple = ()  # (alias name, stored name) of each parameter two parts share


def _axes(mesh: jax.sharding.Mesh, axes) -> tuple[str, ...]:
    """Mesh axes (in mesh order) of a rules value that span more than one device."""
    named = set((axes,) if isinstance(axes, str) else (axes or ()))
    return tuple(a for a in mesh.axis_names if a in named and mesh.shape[a] > 1)


def _spec_axes(spec) -> set[str]:
    used: set[str] = set()
    for entry in spec:
        used |= {entry} if isinstance(entry, str) else set(entry or ())
    return used


def _shard_elements(mesh, shape: tuple[int, ...], spec) -> int:
    return math.prod(dim // axis_size(mesh, axes) for dim, axes in zip(shape, tuple(spec) + (None,) * 8, strict=False))


def _context(cfg: Config, program) -> _Context:
    """The parameters of ``program`` by name: global shape, PartitionSpec (in the model's layer order),
    logical names."""
    abstract = nnx.state(program.model, nnx.Param)
    specs = param_specs(abstract, rules_without_axes(program.rules, {PIPE}) if program.pipeline else program.rules)
    params = {}
    for (path, var), (_, spec) in zip(
        jax.tree_util.tree_flatten_with_path(abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))[0],
        jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0],
        strict=True,
    ):
        names = tuple(var.get_metadata().get("out_sharding") or ())
        params[path_name(path)] = (tuple(var.get_value().shape), spec, names)
    ties = tuple((".".join(map(str, a)), ".".join(map(str, b))) for a, b in model_parts(program.model).ties)
    return _Context(cfg, program.mesh, program.rules, program.model, params, program.pipeline, ties)


def _stage_buffer_terms(ctx: _Context) -> list[Expected]:
    totals: dict[tuple[str, ...], int] = {}
    plan = ctx.pipeline.train
    for buffer in plan.packing.buffers.values():
        axes = tuple(a for a in plan.batch_axes if a not in buffer.tile_axes)
        if axes:
            totals[axes] = totals.get(axes, 0) + buffer.size
    formula = "stage buffer elements per device (padded to the largest stage)"
    return [Expected("gradients (data parallelism)", "all-reduce", axes, n, formula) for axes, n in totals.items()]


def _batch_rows(ctx: _Context, logical: str = "batch") -> int:
    return ctx.cfg.run.batch_size // axis_size(ctx.mesh, ctx.rules.get(logical))


def data_parallel_terms(ctx: _Context) -> list[Expected]:
    """Each gradient all-reduced once over its layer's batch axes minus its own axes.

    Pipelined, each stage's gradient buffers (padded to the largest stage) are summed over the axes
    that split the batch, minus those a buffer is tiled over (FSDP scatters those instead).
    """
    if ctx.pipeline is not None:
        return _stage_buffer_terms(ctx)
    totals: dict[tuple[str, ...], int] = {}
    for shape, spec, names in ctx.params.values():
        batch = ctx.rules.get("conv_batch" if "channels" in names else "batch")
        # Summed over the batch's axes, and apart over the sequence's (XLA adds each partial sum where it arises).
        for split in (batch, ctx.rules.get("seq")):
            axes = tuple(a for a in _axes(ctx.mesh, split) if a not in _spec_axes(spec))
            if axes:
                totals[axes] = totals.get(axes, 0) + _shard_elements(ctx.mesh, shape, spec)
    terms = [
        Expected("gradients (data parallelism)", "all-reduce", axes, n, "sum of parameter elements per device")
        for axes, n in totals.items()
    ]
    return terms


class _Run(NamedTuple):
    """Dense layers that run ``times`` times per step on ``rows`` rows each."""

    chain: list[_Dense]
    rows: int
    times: int
    where: str  # formula prefix, e.g. "L*"


# Layer kinds with a closed form: the attributes that hold their dense maps, in the order data flows
# through them. A layer of another kind with parameters has none (its axis is reported uncovered).
DENSE_MAPS: dict[type, tuple[str, ...]] = {Dense: ("linear",), Embed: ("linear",), MegatronBlock: ("up", "down")}
CHAINED = (Dense,)  # consecutive layers of these kinds form one chain (Megatron pairs across layers)


def _module_parts(model) -> list[tuple[str, nnx.Module, int]]:
    """``(parameter path, module, times it runs)`` of the model's parts in data-flow order (a stack's
    layer once, ``times`` its depth)."""
    parts = []
    for part in model_parts(model).parts():
        module = model
        for key in part.key:
            module = module[key] if isinstance(key, int) else getattr(module, key)
        parts.append((".".join(map(str, part.key)), module, part.depth or 1))
    return parts


def _has_params(module) -> bool:
    return bool(jax.tree.leaves(nnx.state(module, nnx.Param)))


def _dense_runs(ctx: _Context) -> list[_Run] | None:
    """The dense layers in the order data flows through them, or None if a layer has no closed form.

    Pipelined programs have none: their tensor-parallel layers run inside per-stage branches, which the
    compiled program's loop counts cannot attribute to ticks (see :mod:`jaxmp.inspection.collectives`).
    Convolutions (a ``channels`` kernel) add no tensor term unless ``tensor`` splits them (no closed form).
    """
    mesh = ctx.mesh
    if is_pipelined(ctx.cfg.pipeline, mesh.shape[PIPE]):
        return None

    def dense(name: str, first: bool) -> _Dense:
        shape, spec, _ = ctx.params[name + ".kernel"]
        in_axes, out_axes = (tuple(spec) + (None,) * len(shape))[len(shape) - 2 : len(shape)]
        split = [mesh.shape[TENSOR] > 1 and TENSOR in _spec_axes((axes,)) for axes in (in_axes, out_axes)]
        return _Dense(name, shape[-2], shape[-1], col=split[1], row=split[0], first=first)

    runs: list[_Run] = []
    rows, seen_params, chained = _batch_rows(ctx), False, False
    for path, module, times in _module_parts(ctx.model):
        kind = next((k for k in DENSE_MAPS if type(module) is k), None)
        if kind is None:
            if _has_params(module) and not _is_replicated_conv(ctx, path):
                return None
            seen_params, chained = seen_params or _has_params(module), False
            continue
        names = [f"{path}.{attr}" for attr in DENSE_MAPS[kind]]
        chain = [dense(name, first=not seen_params and i == 0) for i, name in enumerate(names)]
        if chained and kind in CHAINED and times == 1:
            runs[-1].chain.extend(chain)
        else:
            runs.append(_Run(chain, rows, times, "L*" if times > 1 else ""))
        seen_params, chained = True, kind in CHAINED and times == 1
    return runs


def _layer_params(ctx: _Context, path: str) -> list[tuple]:
    """``(spec, logical names)`` of every parameter of the part at ``path`` (tied ones included)."""
    stored_as = dict(ctx.ties)
    names = [name for name in (*ctx.params, *stored_as) if name.startswith(path + ".")]
    return [ctx.params[stored_as.get(name, name)][1:] for name in names]


def _is_conv(ctx: _Context, path: str) -> bool:
    return any("channels" in names for _, names in _layer_params(ctx, path))


def _is_replicated_conv(ctx: _Context, path: str) -> bool:
    """A conv layer (``channels`` kernel) that ``tensor`` does not split: data-parallel terms only."""
    return _is_conv(ctx, path) and not any(TENSOR in _spec_axes(spec) for spec, _ in _layer_params(ctx, path))


def _conv_to_dense_gather(ctx: _Context) -> list[Expected]:
    """Hybrid (Krizhevsky 2014): the flattened conv features move from the conv batch split to the dense
    one, an all-gather over the extra axes, at the first dense layer after a conv layer."""
    extra = tuple(
        a for a in _axes(ctx.mesh, ctx.rules.get("conv_batch")) if a not in _axes(ctx.mesh, ctx.rules.get("batch"))
    )
    if not extra:
        return []
    after_conv = False
    for path, module, _ in _module_parts(ctx.model):
        if after_conv and type(module) in DENSE_MAPS:
            first = f"{path}.{DENSE_MAPS[type(module)][0]}"
            features = ctx.params[first + ".kernel"][0][-2]
            g = axis_size(ctx.mesh, extra)
            return [
                Expected(
                    "conv -> dense features",
                    "all-gather",
                    extra,
                    _batch_rows(ctx) * features * (g - 1) // g,
                    "b*F*(g-1)/g",
                )
            ]
        after_conv = after_conv or _is_conv(ctx, path)
    return []


def _split(ctx: _Context, path: str, logical: str) -> bool:
    """Whether ``tensor`` (of more than one device) splits the logical axis ``logical`` of the part's parameters."""
    return ctx.mesh.shape[TENSOR] > 1 and any(
        TENSOR in _spec_axes((axes,))
        for spec, names in _layer_params(ctx, path)
        for axes, name in zip(spec, names, strict=False)
        if name == logical
    )


def _tokens(ctx: _Context) -> tuple[int, int]:
    """``(b*T/C, D)``: the tokens one device holds (its data replica's rows, its part of the sequence)
    and the residual width of a transformer."""
    seq, width = ctx.params["pre.positions"][0]
    return _batch_rows(ctx) * seq // axis_size(ctx.mesh, ctx.rules.get("seq")), width


def _embedding_terms(ctx: _Context, path: str, times: int) -> list[Expected]:
    rows, width = _tokens(ctx)
    if not _split(ctx, path, "vocab"):
        return []
    return [Expected(f"{path}: vocab-split lookup", "all-reduce", (TENSOR,), rows * width, "b*T*D")]


def _block_terms(ctx: _Context, path: str, times: int) -> list[Expected]:
    """Megatron attention (heads) and MLP (``mlp``): each a column/row pair, one all-reduce of the
    residual stream forward (its row output) and one backward (its column input's gradient)."""
    rows, width = _tokens(ctx)
    terms = []
    for name, logical in (("attention", "heads"), ("mlp", "mlp")):
        if _split(ctx, path, logical):
            n = times * rows * width
            terms.append(Expected(f"{path}: {name} row output", "all-reduce", (TENSOR,), n, "L*b*T*D"))
            terms.append(Expected(f"{path}: {name} column input grad", "all-reduce", (TENSOR,), n, "L*b*T*D"))
    return terms


def _head_terms(ctx: _Context, path: str, times: int) -> list[Expected]:
    """The vocab-split head and loss: the logits' max, sum of exponentials and target logit added over
    ``tensor`` (3 per token, the logits never gathered), and the head input's gradient backward."""
    rows, width = _tokens(ctx)
    if not _split(ctx, path, "vocab"):
        return []
    return [
        Expected(f"{path}: vocab-parallel loss", "all-reduce", (TENSOR,), 3 * rows, "3*b*T"),
        Expected(f"{path}: column input grad", "all-reduce", (TENSOR,), rows * width, "b*T*D"),
    ]


# Transformer layer kinds: their tensor terms, per part (``times``: a stack's depth).
LAYER_TERMS = {TokenEmbedding: _embedding_terms, Block: _block_terms, LMHead: _head_terms}


def tensor_terms(ctx: _Context) -> list[Expected] | None:
    """Column, row and Megatron-pair terms, plus hybrid's conv-to-dense all-gather, or a transformer's
    (a model of :data:`LAYER_TERMS` kinds only); None if unknown."""
    parts = _module_parts(ctx.model)
    if all(type(module) in LAYER_TERMS for _, module, _ in parts):
        if ctx.pipeline is not None or ctx.cfg.model.sequence_parallel:  # SP: backend-dependent (see README)
            return None
        return [term for path, module, times in parts for term in LAYER_TERMS[type(module)](ctx, path, times)]
    runs = _dense_runs(ctx)
    if runs is None:
        return None
    t = ctx.mesh.shape[TENSOR]
    terms = [term for run in runs for term in _dense_terms(run.chain, run.rows, run.times, t, run.where)]
    return terms + _conv_to_dense_gather(ctx)


def _dense_terms(chain: list[_Dense], rows: int, times: int, t: int, where: str) -> list[Expected]:
    """Column/row/pair terms of a chain of dense layers run ``times`` times on ``rows`` rows each."""
    terms = []
    for i, d in enumerate(chain):
        before = chain[i - 1] if i else None
        after = chain[i + 1] if i + 1 < len(chain) else None
        gathered = rows * (t - 1) // t
        if d.col and not (after and after.row):
            terms.append(
                Expected(
                    f"{d.name}: column output",
                    "all-gather",
                    (TENSOR,),
                    times * gathered * d.fan_out,
                    f"{where}b*fan_out*(t-1)/t",
                )
            )
        if d.col and not d.first:
            terms.append(
                Expected(
                    f"{d.name}: column input grad",
                    "all-reduce",
                    (TENSOR,),
                    times * rows * d.fan_in,
                    f"{where}b*fan_in",
                )
            )
        if d.row:
            terms.append(
                Expected(
                    f"{d.name}: row output", "all-reduce", (TENSOR,), times * rows * d.fan_out, f"{where}b*fan_out"
                )
            )
        if d.row and not d.first and not (before and before.col):
            terms.append(
                Expected(
                    f"{d.name}: row input grad",
                    "all-gather",
                    (TENSOR,),
                    times * gathered * d.fan_in,
                    f"{where}b*fan_in*(t-1)/t",
                )
            )
    return terms


def context_terms(ctx: _Context) -> list[Expected] | None:
    """Keys and values exchanged over ``context`` by attention (module docstring), per strategy; None
    where there is no closed form (pipelined: per-stage branches; a model without attention)."""
    axes = _axes(ctx.mesh, ctx.rules.get("seq"))
    blocks = [(path, times) for path, module, times in _module_parts(ctx.model) if type(module) is Block]
    if not axes:
        return []
    if ctx.pipeline is not None or not blocks:
        return None
    c = axis_size(ctx.mesh, axes)
    shape, _, _ = ctx.params[f"{blocks[0][0]}.attention.qkv"]
    heads, k = shape[-2] // axis_size(ctx.mesh, ctx.rules.get("heads")), shape[-1]  # [(L,) D, 3, H, K]
    tokens = _batch_rows(ctx) * ctx.params["pre.positions"][0][0] // c
    e = sum(times for _, times in blocks) * tokens * heads * k  # E: one device's keys, all layers
    strategy = ctx.cfg.model.context_strategy
    if strategy == "ring":
        return [
            Expected("attention: K, V on round the ring", "collective-permute", axes, 2 * e * (c - 1), "2*L*E*(C-1)"),
            Expected(
                "attention: K, V, dK, dV back round it", "collective-permute", axes, 2 * e * (2 * c - 1), "2*L*E*(2C-1)"
            ),
        ]
    if strategy == "ulysses":
        return [
            Expected(
                "attention: Q, K, V, O to heads and back", "all-to-all", axes, 8 * e * (c - 1) // c, "8*L*E*(C-1)/C"
            )
        ]
    return [
        Expected("attention: K, V gathered", "all-gather", axes, 2 * e * (c - 1), "2*L*E*(C-1)"),
        Expected("attention: dK, dV summed", "all-reduce", axes, 2 * e * c, "2*L*E*C"),
    ]


def pipeline_terms(ctx: _Context) -> list[Expected] | None:
    """Activations and cotangents between stages over ``pipe``: any model.

    One collective-permute of one micro-batch message per tick of the executor's loops (see
    :attr:`jaxmp.pipeline.transfers.Transfers.permutes`): ``b`` rows of the widest activation between
    two chunks, ``A`` elements per example (the executor pads every message to it). No parameter or
    gradient crosses ``pipe``: each stage's are on its own devices.
    """
    if ctx.pipeline is None:
        return []
    plan = ctx.pipeline.train
    rows = ctx.cfg.run.batch_size // axis_size(ctx.mesh, plan.batch_axes)
    b = rows // plan.schedule.microbatches
    permutes = executor_transfers(plan.schedule).permutes
    return [Expected("activations and cotangents", "collective-permute", (PIPE,), permutes * b * plan.width, "T*b*A")]


def predict(cfg: Config, mesh: jax.sharding.Mesh, input_shape: tuple[int, ...], classes: int, **pieces) -> Prediction:
    """The closed-form terms of ``cfg``'s train step on ``mesh`` (see the module docstring); nothing is
    compiled. ``pieces``: a model of your own and its rules (``model_fn=``, ``rules=``), as
    :func:`jaxmp.training.step.build_program` takes them."""
    from jaxmp.training.step import build_program  # builds the layout only; nothing is compiled

    return predict_program(cfg, build_program(cfg, mesh, input_shape, classes, **pieces))


def predict_program(cfg: Config, program) -> Prediction:
    """The closed-form terms of a built program (any model: layer kinds without one leave their axis
    in ``Prediction.uncovered``)."""
    ctx = _context(cfg, program)
    terms = data_parallel_terms(ctx)
    uncovered: list[str] = []
    for axis, found in ((TENSOR, tensor_terms(ctx)), (CONTEXT, context_terms(ctx)), (PIPE, pipeline_terms(ctx))):
        if found is None and ctx.mesh.shape[axis] > 1:
            uncovered.append(axis)
        terms += found or []
    bubble = program.pipeline.train.schedule.bubble_fraction if program.pipeline else 0.0
    return Prediction(terms, tuple(uncovered), bubble)
