"""Causal self-attention over a sequence that may be split over the ``context`` mesh axis.

Shapes: B = batch, T = tokens, H = heads, K = head width, C = devices of the ``context`` axis.

Everything in a transformer but attention is local to each token, so splitting the sequence over C
devices (the rules table maps ``seq`` and ``tokens`` to ``context``) splits the norms, MLPs and the loss
for free; attention alone needs every earlier token's key and value. :data:`CONTEXT_STRATEGIES` are the
ways it gets them. ``all-gather`` and ``ulysses`` are only sharding constraints (XLA inserts the
collectives); ``ring`` is a hand-written exchange (:mod:`jaxmp.parallel.context`).

Causal balance: with contiguous chunks the last device's queries see the whole sequence and the first's
almost nothing. Under ``balance`` the step feeds the tokens in head-tail order (device r holds chunk r and
chunk 2C-1-r of 2C), the position table and the mask read the true positions, and the loss, a mean
over tokens, does not care about their order.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxmp.parallel.context import head_tail_order, ring_attention
from jaxmp.parallel.rules import active_rules, as_axes, constrain

CONTEXT_STRATEGIES = {
    "all-gather": "gather every key and value over context (MaxText's default)",
    "ring": "pass key/value blocks round the context devices with an online softmax (Liu et al. 2023)",
    "ulysses": "an all-to-all from a split of the sequence to a split of the heads (Jacobs et al. 2023)",
}


def sequence_axes() -> tuple[str, ...]:
    """The mesh axes (of more than one device) that split the sequence in the step being traced."""
    rules, mesh = active_rules(), jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return ()
    return tuple(a for a in as_axes(rules.get("seq")) if mesh.shape[a] > 1)


def context_parts() -> int:
    """C: how many parts the sequence is split into in the step being traced (1 outside a step)."""
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[a] for a in sequence_axes())


@dataclasses.dataclass(frozen=True)
class ContextAttention:
    """How attention runs when the sequence is split: ``strategy`` (a :data:`CONTEXT_STRATEGIES` key)
    and ``balance`` (head-tail order)."""

    strategy: str = "all-gather"
    balance: bool = True

    def positions(self, seq_len: int) -> np.ndarray:
        """The position of each token in the order the step holds them (``arange`` unless balanced)."""
        parts = context_parts()
        return head_tail_order(seq_len, parts) if self.balance and parts > 1 else np.arange(seq_len)

    def order(self, seq_len: int) -> np.ndarray | None:
        """The permutation the step applies to a batch's tokens and labels, ``None`` when there is none."""
        positions = self.positions(seq_len)
        return None if np.array_equal(positions, np.arange(seq_len)) else positions

    def __call__(self, q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array, v_BxTxHxK: jax.Array) -> jax.Array:
        """Causal attention; the output keeps the queries' layout (``batch, seq, heads``)."""
        if context_parts() == 1:
            return jax.nn.dot_product_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, is_causal=True)
        positions_T = self.positions(q_BxTxHxK.shape[1])
        if self.strategy == "ring":
            return _ring(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, positions_T)
        # all-gather: queries stay split, keys and values whole; ulysses: all three whole over the
        # sequence and split by heads instead (an all-to-all each way).
        ulysses = self.strategy == "ulysses"
        q_names = ("batch", "kv_seq", "seq_heads", None) if ulysses else ("batch", "seq", "heads", None)
        kv_names = ("batch", "kv_seq", "seq_heads" if ulysses else "heads", None)
        q, k, v = constrain(q_BxTxHxK, q_names), constrain(k_BxTxHxK, kv_names), constrain(v_BxTxHxK, kv_names)
        mask_TxT = jnp.asarray(positions_T[:, None] >= positions_T[None, :])
        # The output first in the queries' layout, so the way back is one all-to-all of o (under Ulysses),
        # not of the [B, H, T, T] probabilities in the backward.
        o_BxTxHxK = constrain(jax.nn.dot_product_attention(q, k, v, mask=mask_TxT[None, None]), q_names)
        return constrain(o_BxTxHxK, ("batch", "seq", "heads", None))


def _ring(q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array, v_BxTxHxK: jax.Array, positions_T: np.ndarray) -> jax.Array:
    """Ring attention over the one mesh axis that splits the sequence (``check_mesh`` refuses more)."""
    (axis,) = sequence_axes()
    q, k, v = (constrain(a, ("batch", "seq", "heads", None)) for a in (q_BxTxHxK, k_BxTxHxK, v_BxTxHxK))
    return ring_attention(q, k, v, positions_T, axis)
