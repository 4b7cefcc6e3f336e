"""Context parallelism: ring attention (Liu et al. 2023, "Ring Attention with Blockwise Transformers").

Shapes: B = batch, T = tokens of the whole sequence, C = devices on the ``context`` mesh axis,
Tc = T / C tokens per device, H = heads, K = head width.

The one idea: the sequence is split over a ``context`` mesh axis, and no device ever holds the whole
sequence's keys and values. Each device keeps its queries and passes its K/V block around a ring of the
C devices (``lax.ppermute`` to the next one), attending to each block as it arrives and merging the
partial results with an online softmax (Milakov & Gimelshein 2018; FlashAttention). The backward pass
sends the K/V blocks around again, this time with their dK/dV accumulators riding along, so each
device's gradients come home after a full lap. Memory per device is O(Tc) whatever T is, and the only
collectives are C point-to-point sends per pass, which a scheduler can overlap with the block's matmuls.

Causal masking: each device's tokens are taken in halves, and a pair of halves (queries, keys) that no
query sees is skipped (``lax.cond``). With contiguous chunks that leaves the last device with the whole
triangle and the first with almost nothing. Head-tail ("zig-zag", as in torchtitan) order cuts the
sequence into 2C chunks and gives device r chunks r and 2C-1-r: every other device's block is then
exactly half seen, so every device computes the same (:func:`useful_pairs`), half of a full block per
hop. The mask is written with global positions, so any order works unchanged.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxmp.config import ConfigError


def head_tail_order(seq_len: int, parts: int) -> np.ndarray:
    """Global token positions in the order the ``parts`` devices of a ``context`` axis hold them.

    The sequence is cut into ``2 * parts`` equal chunks; device r holds chunk r then chunk
    ``2 * parts - 1 - r``, so ``order.reshape(parts, -1)[r]`` are device r's positions. Why: under a causal
    mask an early chunk is cheap and a late one expensive; pairing them evens out the work.

    Raises:
      ConfigError: ``seq_len`` is not a multiple of ``2 * parts``.
    """
    if parts < 1 or seq_len % (2 * parts):
        raise ConfigError(f"sequence length {seq_len} must be a multiple of 2 * context size = {2 * parts}.")
    chunks = np.arange(seq_len, dtype=np.int32).reshape(2 * parts, -1)
    first = np.arange(parts)
    return chunks[np.stack([first, 2 * parts - 1 - first], axis=1).reshape(-1)].reshape(-1)


def useful_pairs(positions_per_device: np.ndarray) -> np.ndarray:
    """Unmasked (query, key) pairs each device computes under the causal mask: its useful attention work.

    Args:
      positions_per_device: ``[C, Tc]`` each device's query positions, together a permutation of
        ``range(T)``.

    Returns:
      ``[C]``: the query at position p sees the p + 1 keys at positions 0..p, wherever they are held.
    """
    return (np.asarray(positions_per_device, dtype=np.int64) + 1).sum(axis=1)


def ring_work(positions_per_device: np.ndarray) -> np.ndarray:
    """Query-key pairs each device's ring computes (the pairs of halves it does not skip), forward: its
    attention FLOPs up to a constant.

    Args:
      positions_per_device: ``[C, Tc]`` each device's token positions, as for :func:`useful_pairs`.

    Returns:
      ``[C]``; against :func:`useful_pairs`, the work spent on masked pairs inside the halves it computes.
    """
    held = np.asarray(positions_per_device)
    tokens = held.shape[1]
    return np.array(
        [
            sum(
                (qs.stop - qs.start) * (ks.stop - ks.start)
                for s in range(len(held))
                for qs in _pieces(tokens)
                for ks in _pieces(tokens)
                if held[r][qs].max() >= held[s][ks].min()
            )
            for r in range(len(held))
        ]
    )


def ring_perm(size: int) -> list[tuple[int, int]]:
    """The ring's one hop: device i sends to device i + 1 (the last to the first).

    The only place the ring is written, so a test can break it (drop an edge) as the negative control
    of ``poison``."""
    return [(i, (i + 1) % size) for i in range(size)]


def _rotate(tree, axis: str, poison: bool):
    """Send every array of ``tree`` one hop along the ring over ``axis``.

    With ``poison``, a device that the hop did not send to reads NaN instead of ``ppermute``'s zeros:
    the receive side starts as garbage, as a real buffer would, so an edge missing from the ring cannot
    pass for a block of zeros."""
    perm = ring_perm(lax.axis_size(axis))
    sent = jax.tree.map(lambda x: lax.ppermute(x, axis, perm), tree)
    if not poison:
        return sent
    arrived = lax.ppermute(lax.axis_index(axis) >= 0, axis, perm)  # False where nothing was sent

    return jax.tree.map(lambda x: jnp.where(arrived, x, jnp.nan), sent)


class _Block(NamedTuple):
    """A K/V block travelling around the ring, with its tokens' global positions (looked up, not sent:
    after ``hop`` hops a device holds the block of the device ``hop`` places before it)."""

    k_BxTcxHxK: jax.Array
    v_BxTcxHxK: jax.Array
    pos_Tc: jax.Array

    @staticmethod
    def arrived(kv: tuple, hop, positions_CxTc: jax.Array, axis: str) -> _Block:
        source = (lax.axis_index(axis) - hop) % lax.axis_size(axis)
        return _Block(*kv, positions_CxTc[source])


class _Softmax(NamedTuple):
    """A softmax over some of the keys, not yet normalised: row max, row sum of exp, and exp @ V (float32)."""

    m_BxTcxH: jax.Array
    l_BxTcxH: jax.Array
    acc_BxTcxHxK: jax.Array


def _scores(q_BxTcxHxK, q_pos_Tc, block: _Block) -> jax.Array:
    """Scaled logits in float32, ``-inf`` where the key is in the query's future."""
    scale = 1.0 / math.sqrt(q_BxTcxHxK.shape[-1])
    f32 = jnp.float32
    s_BxTcxHxTc = jnp.einsum("bqhd,bshd->bqhs", q_BxTcxHxK.astype(f32), block.k_BxTcxHxK.astype(f32)) * scale
    mask_TcxTc = q_pos_Tc[:, None] >= block.pos_Tc[None, :]
    return jnp.where(mask_TcxTc[None, :, None, :], s_BxTcxHxTc, -jnp.inf)


def _finite(m):
    """A finite reference for exp: a row with no unmasked key yet (max -inf) uses 0, so exp gives 0, not NaN."""
    return jnp.where(jnp.isneginf(m), 0.0, m)


def _attend(q_BxTcxHxK, q_pos_Tc, block: _Block) -> _Softmax:
    """The local queries' partial softmax over one block."""
    s_BxTcxHxTc = _scores(q_BxTcxHxK, q_pos_Tc, block)
    m_BxTcxH = s_BxTcxHxTc.max(-1)
    p_BxTcxHxTc = jnp.exp(s_BxTcxHxTc - _finite(m_BxTcxH)[..., None])
    acc_BxTcxHxK = jnp.einsum("bqhs,bshd->bqhd", p_BxTcxHxTc, block.v_BxTcxHxK.astype(jnp.float32))
    return _Softmax(m_BxTcxH, p_BxTcxHxTc.sum(-1), acc_BxTcxHxK)


def _nothing(q_BxtxHxK, q_pos_t, block: _Block) -> _Softmax:
    """The partial softmax over no key at all (what a wholly masked block contributes)."""
    zero_BxtxHxK = jnp.zeros_like(q_BxtxHxK, jnp.float32)  # like q: varying over the ring's axis
    return _Softmax(zero_BxtxHxK[..., 0] - jnp.inf, zero_BxtxHxK[..., 0], zero_BxtxHxK)


def _pieces(tokens: int) -> list[slice]:
    """A device's tokens in halves (one piece when odd): under head-tail order, its two chunks."""
    return [slice(0, tokens)] if tokens % 2 else [slice(0, tokens // 2), slice(tokens // 2, tokens)]


def _sees(q_pos_t, k_pos_t) -> jax.Array:
    """Whether some query sees some key: a pair of pieces that is not wholly masked."""
    return jnp.max(q_pos_t) >= jnp.min(k_pos_t)


def _pairs(q_tokens: int, block: _Block):
    """``(query slice, key slice, key piece)`` for every pair of halves of the queries and a block."""
    for qs in _pieces(q_tokens):
        for ks in _pieces(block.pos_Tc.shape[0]):
            yield qs, ks, _Block(block.k_BxTcxHxK[:, ks], block.v_BxTcxHxK[:, ks], block.pos_Tc[ks])


def _attend_seen(q_BxTcxHxK, q_pos_Tc, block: _Block) -> _Softmax:
    """:func:`_attend`, piece by piece, skipping (``lax.cond``) the pairs of halves no query sees.

    Why: under head-tail order every block but a device's own is exactly half masked (its head half
    sees all of an earlier device's block, its tail half none of a later one's), so the skip halves
    the work of every hop and keeps it the same on every device; with contiguous chunks a later
    device's block is skipped whole, and the earliest devices idle."""
    rows = {}
    for qs, _, piece in _pairs(q_BxTcxHxK.shape[1], block):
        args = (q_BxTcxHxK[:, qs], q_pos_Tc[qs], piece)
        part = lax.cond(_sees(q_pos_Tc[qs], piece.pos_Tc), _attend, _nothing, *args)
        rows[qs.start] = part if qs.start not in rows else _merge(rows[qs.start], part)
    return _Softmax(*(jnp.concatenate(parts, axis=1) for parts in zip(*rows.values(), strict=True)))


def _merge(a: _Softmax, b: _Softmax) -> _Softmax:
    """Two partial softmaxes over disjoint keys -> one over their union (rescaled to the larger max)."""
    m_BxTcxH = jnp.maximum(a.m_BxTcxH, b.m_BxTcxH)
    ref = _finite(m_BxTcxH)
    wa, wb = jnp.exp(a.m_BxTcxH - ref), jnp.exp(b.m_BxTcxH - ref)
    return _Softmax(
        m_BxTcxH,
        wa * a.l_BxTcxH + wb * b.l_BxTcxH,
        wa[..., None] * a.acc_BxTcxHxK + wb[..., None] * b.acc_BxTcxHxK,
    )


def _loop(hops: int, step, init):
    """``step(i, carry)`` for ``i < hops``, in a ``while_loop``.

    Why not ``fori_loop``: with static bounds it is a ``scan``, and a ``custom_vjp`` whose forward holds
    one, inside the ``scan`` over a model's layers, gets that forward linearized all the same: every
    hop's scores and masks stacked ``[C-1, ...]`` and kept (``experiments/results/context_parallel.md``).
    A ``while_loop`` cannot be linearized that way, so only this module's backward runs."""

    def body(state):
        i, carry = state
        return i + 1, step(i, carry)

    return lax.while_loop(lambda state: state[0] < hops, body, (jnp.int32(0), init))[1]


def _forward(q_BxTcxHxK, k_BxTcxHxK, v_BxTcxHxK, positions_CxTc, axis, poison):
    """Output and log-sum-exp per row: the local block first, then C - 1 rotations, each attended.

    Starting from the local block (rather than from -inf / 0 sentinels) leaves no initial buffer, and
    rotating before attending skips the last, useless hop."""
    block = _Block.arrived((k_BxTcxHxK, v_BxTcxHxK), 0, positions_CxTc, axis)
    q_pos_Tc = block.pos_Tc

    def step(i, carry):
        block, sm = carry
        kv = _rotate((block.k_BxTcxHxK, block.v_BxTcxHxK), axis, poison)
        block = _Block.arrived(kv, i + 1, positions_CxTc, axis)
        return block, _merge(sm, _attend_seen(q_BxTcxHxK, q_pos_Tc, block))

    init = (block, _attend_seen(q_BxTcxHxK, q_pos_Tc, block))
    _, sm = _loop(lax.axis_size(axis) - 1, step, init)
    # Every row sees at least its own token over the whole ring, so l > 0.
    o_BxTcxHxK = sm.acc_BxTcxHxK / sm.l_BxTcxH[..., None]
    return o_BxTcxHxK.astype(q_BxTcxHxK.dtype), sm.m_BxTcxH + jnp.log(sm.l_BxTcxH)


class _Grads(NamedTuple):
    """float32 gradient accumulators: dq stays home, dk/dv travel with their block."""

    dq_BxTcxHxK: jax.Array
    dk_BxTcxHxK: jax.Array
    dv_BxTcxHxK: jax.Array


def _block_grads(q_BxTcxHxK, q_pos_Tc, block, do_BxTcxHxK, lse_BxTcxH, d_BxTcxH) -> _Grads:
    """FlashAttention-2's backward for one block: P from the saved log-sum-exp, dS = P * (dP - D)."""
    f32 = jnp.float32
    scale = 1.0 / math.sqrt(q_BxTcxHxK.shape[-1])
    p_BxTcxHxTc = jnp.exp(_scores(q_BxTcxHxK, q_pos_Tc, block) - lse_BxTcxH[..., None])
    dv_BxTcxHxK = jnp.einsum("bqhs,bqhd->bshd", p_BxTcxHxTc, do_BxTcxHxK)
    dp_BxTcxHxTc = jnp.einsum("bqhd,bshd->bqhs", do_BxTcxHxK, block.v_BxTcxHxK.astype(f32))
    ds_BxTcxHxTc = p_BxTcxHxTc * (dp_BxTcxHxTc - d_BxTcxH[..., None]) * scale
    dq_BxTcxHxK = jnp.einsum("bqhs,bshd->bqhd", ds_BxTcxHxTc, block.k_BxTcxHxK.astype(f32))
    dk_BxTcxHxK = jnp.einsum("bqhs,bqhd->bshd", ds_BxTcxHxTc, q_BxTcxHxK.astype(f32))
    return _Grads(dq_BxTcxHxK, dk_BxTcxHxK, dv_BxTcxHxK)


def _no_grads(q_BxtxHxK, q_pos_t, block: _Block, *_) -> _Grads:
    """What a wholly masked pair of pieces adds to the gradients (zeros like the arrays: varying over the ring)."""
    return _Grads(*(jnp.zeros_like(a, jnp.float32) for a in (q_BxtxHxK, block.k_BxTcxHxK, block.v_BxTcxHxK)))


def _grads_seen(q_BxTcxHxK, q_pos_Tc, block: _Block, do_BxTcxHxK, lse_BxTcxH, d_BxTcxH) -> _Grads:
    """:func:`_block_grads`, piece by piece, skipping the pairs of halves no query sees (as :func:`_attend_seen`)."""
    total = _Grads(*(jnp.zeros_like(a, jnp.float32) for a in (q_BxTcxHxK, block.k_BxTcxHxK, block.v_BxTcxHxK)))
    for qs, ks, piece in _pairs(q_BxTcxHxK.shape[1], block):
        args = (q_BxTcxHxK[:, qs], q_pos_Tc[qs], piece, do_BxTcxHxK[:, qs], lse_BxTcxH[:, qs], d_BxTcxH[:, qs])
        g = lax.cond(_sees(q_pos_Tc[qs], piece.pos_Tc), _block_grads, _no_grads, *args)
        total = _Grads(
            total.dq_BxTcxHxK.at[:, qs].add(g.dq_BxTcxHxK),
            total.dk_BxTcxHxK.at[:, ks].add(g.dk_BxTcxHxK),
            total.dv_BxTcxHxK.at[:, ks].add(g.dv_BxTcxHxK),
        )
    return total


def _backward(q_BxTcxHxK, k_BxTcxHxK, v_BxTcxHxK, positions_CxTc, o_BxTcxHxK, lse_BxTcxH, do_BxTcxHxK, axis, poison):
    """One lap: the local block, C - 1 rotations of (K, V, dK, dV), then one more hop brings dK/dV home."""
    do_BxTcxHxK = do_BxTcxHxK.astype(jnp.float32)
    d_BxTcxH = (do_BxTcxHxK * o_BxTcxHxK.astype(jnp.float32)).sum(-1)
    block = _Block.arrived((k_BxTcxHxK, v_BxTcxHxK), 0, positions_CxTc, axis)
    q_pos_Tc = block.pos_Tc

    def grads(block):
        return _grads_seen(q_BxTcxHxK, q_pos_Tc, block, do_BxTcxHxK, lse_BxTcxH, d_BxTcxH)

    def step(i, carry):
        block, g = carry
        k, v, dk, dv = _rotate((block.k_BxTcxHxK, block.v_BxTcxHxK, g.dk_BxTcxHxK, g.dv_BxTcxHxK), axis, poison)
        block = _Block.arrived((k, v), i + 1, positions_CxTc, axis)
        new = grads(block)
        return block, _Grads(g.dq_BxTcxHxK + new.dq_BxTcxHxK, dk + new.dk_BxTcxHxK, dv + new.dv_BxTcxHxK)

    init = (block, grads(block))
    _, g = _loop(lax.axis_size(axis) - 1, step, init)
    dk_BxTcxHxK, dv_BxTcxHxK = _rotate((g.dk_BxTcxHxK, g.dv_BxTcxHxK), axis, poison)
    return (
        g.dq_BxTcxHxK.astype(q_BxTcxHxK.dtype),
        dk_BxTcxHxK.astype(k_BxTcxHxK.dtype),
        dv_BxTcxHxK.astype(v_BxTcxHxK.dtype),
    )


def _per_device(fn, axis: str, in_names: str, out_names: str):
    """``fn`` under a ``shard_map`` manual over ``axis`` only: ``s`` marks a ``[B, T, ...]`` argument or
    result split along T, ``p`` the positions ``[T]`` (every device has them all: a few integers)."""
    specs = {"s": P(None, axis), "p": P()}
    return jax.shard_map(
        fn,
        in_specs=tuple(specs[n] for n in in_names),
        out_specs=tuple(specs[n] for n in out_names),
        axis_names={axis},
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ring(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, positions_T, axis, poison):
    return _ring_fwd(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, positions_T, axis, poison)[0]


def _ring_fwd(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, positions_T, axis, poison):
    def forward(q, k, v, positions_T):
        return _forward(q, k, v, positions_T.reshape(lax.axis_size(axis), -1), axis, poison)

    forward = _per_device(forward, axis, "sssp", "ss")
    o_BxTxHxK, lse_BxTxH = forward(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, positions_T)
    # Only each device's own arrays: the other devices' blocks are sent around again in the backward.
    return o_BxTxHxK, (q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, positions_T, o_BxTxHxK, lse_BxTxH)


def _ring_bwd(axis, poison, residuals, do_BxTxHxK):
    q, k, v, pos, o, lse = residuals

    def backward(q, k, v, pos, o, lse, do):
        return _backward(q, k, v, pos.reshape(lax.axis_size(axis), -1), o, lse, do, axis, poison)

    grads = _per_device(backward, axis, "sssps" + "ss", "sss")(q, k, v, pos, o, lse, do_BxTxHxK)
    return (*grads, None)  # positions are integers: no cotangent


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, positions_T, axis: str, *, poison: bool = False):
    """Causal attention over a sequence split along ``axis``, K/V passed around a ring of its devices.

    Global arrays in, global arrays out (under ``jax.set_mesh``; the other mesh axes stay automatic, so
    heads split over ``tensor`` stay split). Equals ``jax.nn.dot_product_attention`` (scale 1/sqrt(K), mask
    ``positions[q] >= positions[k]``), but no device holds more than two K/V blocks at a time, forward or
    backward. The ``custom_vjp`` sits outside the ``shard_map``s, one for the forward and one for the
    backward: the residuals are plain outputs of the first, each device's own q, k, v, o and log-sum-exp.
    (Differentiating a ``shard_map`` nested in the pipeline's own ``shard_map`` fails to lower in jax 0.10:
    its residuals get specs over the outer map's manual axes.) Softmax statistics and accumulators are float32.

    Args:
      q_BxTxHxK, k_BxTxHxK, v_BxTxHxK: the sequence in the order its devices hold it.
      positions_T: int32 global position of each token, in that order (e.g. :func:`head_tail_order`); each
        query must see at least one key over the whole sequence.
      axis: the mesh axis the sequence is split over (its size C is the number of ring steps).
      poison: test switch. The receive side of every hop starts as NaN instead of ``ppermute``'s
        zeros, so a device that a hop does not reach yields NaN in the output and gradients. There are
        no other buffers to poison: the statistics and accumulators start from the local block. As a
        negative control, replace :func:`ring_perm` with a broken ring: NaN must then appear.

    Returns:
      ``[B, T, H, K]`` in the dtype of ``q``, split along T like ``q``.
    """
    return _ring(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, jnp.asarray(positions_T, jnp.int32), axis, poison)
