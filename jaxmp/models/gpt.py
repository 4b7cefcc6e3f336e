"""A decoder-only transformer language model (GPT-2's shape) written as a list of layers.

Shapes: B = batch, T = tokens, D = width, H = heads, K = head width (D / H), F = MLP hidden width,
V = vocabulary.

``pre`` embeds the token ids and adds learned positions; ``layers`` is one :class:`Stacked` run of
pre-norm blocks (causal self-attention, then an MLP, each added to the residual stream); ``post`` is the
final norm and the LM head, giving logits ``[B, T, V]`` that the vocab-parallel cross-entropy
(:func:`jaxmp.training.step.cross_entropy`) reads per token.

Tensor parallelism is Megatron's (Shoeybi et al. 2019, section 3), named by logical axes only:
- attention: the fused Q/K/V kernel ``[D, 3, H, K]`` is split by heads (a column split: each device
  computes its heads' queries, keys and values and attends over them alone), the output kernel
  ``[H, K, D]`` by rows: one all-reduce forward and one backward per attention, as for the MLP pair;
- the embedding table ``[V, D]`` and the head ``[D, V]`` are split over the vocabulary: each device
  looks up the ids of its slice (XLA masks the others and adds the partial rows), and computes the
  logits of its slice, which the loss never gathers.
Q, K and V sit on their own axis of the fused kernel, so splitting them apart moves no data: the usual
``jnp.split(qkv, 3, -1)`` of a ``[.., 3D]`` projection split over ``tensor`` would cut across devices.

Sequence parallelism (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models"): the residual stream's ``tokens`` axis is split over ``tensor`` too, so the norms, dropout and
residual adds between the matmuls hold ``T / t`` tokens per device; each all-reduce after a row-split
matmul becomes a reduce-scatter into the token split, and the column-split matmul's input is
all-gathered first: the same bytes, a ``t``-th of those regions' activations.

Context parallelism: ``seq`` and ``tokens`` are split over the ``context`` axis too, so every layer but
attention works on ``T / C`` tokens per device; attention reaches the other parts of the sequence as
:mod:`jaxmp.models.attention` says.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmp.config import ConfigError
from jaxmp.models.attention import ContextAttention
from jaxmp.models.layers import LayerContext, Stacked, activation_fn, dense, partitioned
from jaxmp.parallel.rules import constrain

INIT_STD = 0.02  # GPT-2's initial weight scale; residual projections get 1/sqrt(2 * depth) of it
# The residual stream between the tensor-parallel matmuls: its sequence axis is ``tokens``, which
# sequence parallelism splits over ``tensor`` (norms, dropout and residual adds then work on 1/t of the
# tokens); ``seq`` (attention's queries, the MLP's hidden layer, the logits) is split over ``context`` only.
TOKENS = ("batch", "tokens", "embed")
DEFAULT_CONTEXT = ContextAttention()  # all-gather, balanced (where a context axis splits the sequence)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple, std: float = INIT_STD) -> nnx.Param:
    return nnx.Param(partitioned(nnx.initializers.normal(std), names)(rngs.params(), shape, jnp.float32))


def _zeros(shape: tuple[int, ...], names: tuple) -> nnx.Param:
    return nnx.Param(partitioned(nnx.initializers.zeros_init(), names)(jax.random.key(0), shape, jnp.float32))


def layer_norm(width: int, *, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        width,
        dtype=dtype,
        scale_init=partitioned(nnx.initializers.ones_init(), ("embed",)),
        bias_init=partitioned(nnx.initializers.zeros_init(), ("embed",)),
        rngs=rngs,
    )


def token_dropout(
    x_BxTxD: jax.Array, rate: float, ctx: LayerContext, salt: int, order_T: np.ndarray | None
) -> jax.Array:
    """Dropout with one mask per example drawn from its global id and read at the tokens' true
    positions, ``order_T`` when they are not in order (the same on any mesh, schedule and token order)."""
    if not ctx.train or rate == 0.0:
        return x_BxTxD
    key = jax.random.fold_in(ctx.key, salt)

    def keep(example_id):
        mask_TxD = jax.random.bernoulli(jax.random.fold_in(key, example_id), 1.0 - rate, x_BxTxD.shape[1:])
        return mask_TxD if order_T is None else mask_TxD[order_T]

    return jnp.where(jax.vmap(keep)(ctx.example_ids), x_BxTxD / (1.0 - rate), jnp.zeros_like(x_BxTxD))


class TokenEmbedding(nnx.Module):
    """Token ids ``[B, T]`` -> residual stream ``[B, T, D]``: a vocab-split table plus learned positions
    (the rows of the tokens' true positions, in whatever order ``context`` holds them)."""

    def __init__(
        self, vocab: int, seq_len: int, width: int, context: ContextAttention, *, rngs: nnx.Rngs, dtype=jnp.float32
    ):
        self.tokens = _param(rngs, (vocab, width), ("vocab", "embed"))
        self.positions = _param(rngs, (seq_len, width), ("positions", "embed"))
        self.context, self.dtype = context, dtype

    def __call__(self, ids_BxT: jax.Array, ctx: LayerContext | None = None) -> jax.Array:
        # The lookup whole over the sequence (each device adds the rows of its vocabulary slice), then
        # split by tokens: a lookup straight into the token split would gather the whole table instead.
        order_T = self.context.order(ids_BxT.shape[1])
        table_TxD = self.positions[...][: ids_BxT.shape[1]] if order_T is None else self.positions[...][order_T]
        h_BxTxD = jnp.take(self.tokens[...], ids_BxT, axis=0) + table_TxD
        return constrain(constrain(h_BxTxD.astype(self.dtype), ("batch", "seq", "embed")), TOKENS)


class CausalSelfAttention(nnx.Module):
    """Multi-head causal self-attention, heads split over ``tensor``, the sequence over ``context`` as
    :class:`ContextAttention` says (``jax.nn.dot_product_attention`` when whole: XLA on CPU, cuDNN's fused
    attention on GPU where it applies)."""

    def __init__(
        self, width: int, heads: int, depth: int, context: ContextAttention, *, rngs: nnx.Rngs, dtype=jnp.float32
    ):
        k = width // heads
        self.qkv = _param(rngs, (width, 3, heads, k), ("embed", None, "heads", None))
        self.qkv_bias = _zeros((3, heads, k), (None, "heads", None))
        self.out = _param(rngs, (heads, k, width), ("heads", None, "embed"), INIT_STD / math.sqrt(2 * depth))
        self.out_bias = _zeros((width,), ("embed",))
        self.context, self.dtype = context, dtype

    def __call__(self, x_BxTxD: jax.Array, ctx: LayerContext | None = None) -> jax.Array:
        dt = self.dtype
        qkv_3xBxTxHxK = jnp.einsum("btd,dshk->sbthk", x_BxTxD.astype(dt), self.qkv[...].astype(dt))
        qkv_3xBxTxHxK = qkv_3xBxTxHxK + self.qkv_bias[...].astype(dt)[:, None, None]
        qkv_3xBxTxHxK = constrain(qkv_3xBxTxHxK, (None, "batch", "seq", "heads", None))
        q, k, v = qkv_3xBxTxHxK
        o_BxTxHxK = constrain(self.context(q, k, v), ("batch", "seq", "heads", None))
        y_BxTxD = jnp.einsum("bthk,hkd->btd", o_BxTxHxK, self.out[...].astype(dt))
        return y_BxTxD + self.out_bias[...].astype(dt)


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``h + mlp(norm(h))``; the MLP is a
    Megatron column/row pair (``mlp`` on ``tensor``)."""

    def __init__(
        self,
        width: int,
        hidden: int,
        heads: int,
        depth: int,
        activation: str,
        dropout: float,
        context: ContextAttention,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        self.attention_norm = layer_norm(width, rngs=rngs, dtype=dtype)
        self.attention = CausalSelfAttention(width, heads, depth, context, rngs=rngs, dtype=dtype)
        self.mlp_norm = layer_norm(width, rngs=rngs, dtype=dtype)
        self.up = dense(width, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.down = dense(hidden, width, ("mlp", "embed"), rngs=rngs, dtype=dtype)
        self.activation, self.dropout = activation, dropout

    def __call__(self, x_BxTxD: jax.Array, ctx: LayerContext) -> jax.Array:
        order_T = self.attention.context.order(x_BxTxD.shape[1])
        with jax.numpy_dtype_promotion("standard"):  # flax's LayerNorm keeps float32 statistics
            a_BxTxD = self.attention(self.attention_norm(x_BxTxD), ctx)
        a_BxTxD = constrain(a_BxTxD, TOKENS)  # under sequence parallelism: a reduce-scatter, not an all-reduce
        h_BxTxD = constrain(x_BxTxD + token_dropout(a_BxTxD, self.dropout, ctx, 0, order_T), TOKENS)
        with jax.numpy_dtype_promotion("standard"):
            normed_BxTxD = self.mlp_norm(h_BxTxD)
        u_BxTxF = constrain(activation_fn(self.activation)(self.up(normed_BxTxD)), ("batch", "seq", "mlp"))
        m_BxTxD = constrain(self.down(u_BxTxF), TOKENS)
        return constrain(h_BxTxD + token_dropout(m_BxTxD, self.dropout, ctx, 1, order_T), TOKENS)


class LMHead(nnx.Module):
    """Final norm and the vocabulary projection: logits ``[B, T, V]``, split over the vocabulary.

    With ``table`` (the embedding's ``[V, D]`` parameter itself, not a copy) the projection is its
    transpose: tied embeddings (Press & Wolf 2017, GPT-2), one parameter whose gradient sums both uses."""

    def __init__(self, width: int, vocab: int, *, table: nnx.Param | None = None, rngs: nnx.Rngs, dtype=jnp.float32):
        self.norm = layer_norm(width, rngs=rngs, dtype=dtype)
        if table is None:
            self.kernel = _param(rngs, (width, vocab), ("embed", "vocab"))
        else:
            self.table = table
        self.dtype = dtype

    def __call__(self, h_BxTxD: jax.Array, ctx: LayerContext | None = None) -> jax.Array:
        with jax.numpy_dtype_promotion("standard"):
            normed_BxTxD = self.norm(h_BxTxD).astype(self.dtype)
        if hasattr(self, "table"):
            logits_BxTxV = jnp.einsum("btd,vd->btv", normed_BxTxD, self.table[...].astype(self.dtype))
        else:
            logits_BxTxV = jnp.einsum("btd,dv->btv", normed_BxTxD, self.kernel[...].astype(self.dtype))
        return constrain(logits_BxTxV, ("batch", "seq", "vocab"))


class GPT(nnx.Module):
    """``pre``: token and position embedding; ``layers``: ``depth`` blocks (one :class:`Stacked`);
    ``post``: final norm and LM head, which with ``tie_embeddings`` reuses the token table. Learned
    positions (GPT-2), not RoPE: ``seq_len`` is the longest window the model reads."""

    BOUNDARY_NAMES = TOKENS  # between pipeline stages the residual stream keeps its layout (split by tokens under SP)

    def __init__(
        self,
        vocab: int,
        seq_len: int,
        *,
        width: int,
        hidden: int,
        heads: int,
        depth: int,
        activation: str = "gelu",
        dropout: float = 0.0,
        tie_embeddings: bool = False,
        context: ContextAttention = DEFAULT_CONTEXT,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        if width % heads:
            raise ConfigError(f"--width {width} is not divisible by --heads {heads} (each head gets width / heads).")
        self.pre = TokenEmbedding(vocab, seq_len, width, context, rngs=rngs, dtype=dtype)
        self.layers = nnx.List(
            [
                Stacked(
                    lambda r: Block(width, hidden, heads, depth, activation, dropout, context, rngs=r, dtype=dtype),
                    depth,
                    rngs=rngs,
                )
            ]
        )
        table = self.pre.tokens if tie_embeddings else None
        self.post = LMHead(width, vocab, table=table, rngs=rngs, dtype=dtype)
        self.context = context

    def sequence_order(self, seq_len: int) -> np.ndarray | None:
        """The order in which a step feeds a batch's tokens and labels (``None``: as they are)."""
        return self.context.order(seq_len)


def check_split(flag: str, size: int, mesh_shape: dict, axes: tuple[str, ...], what: str) -> None:
    """``size`` must divide over the mesh axes ``axes`` (``ConfigError`` naming the flag, both numbers and
    the axes of more than one device)."""
    axes = tuple(axis for axis in axes if mesh_shape.get(axis, 1) > 1)
    parts = math.prod(mesh_shape[axis] for axis in axes)
    if size % parts:
        raise ConfigError(
            f"{flag} {size} is not divisible by {parts}, the devices of mesh axes {'x'.join(axes)} that split "
            f"{what}; choose a {flag} that divides, or a smaller {'x'.join(axes)} axis."
        )
