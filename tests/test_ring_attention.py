"""Ring attention against plain attention on one device: outputs, gradients, collectives, poison."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxmp.config import ConfigError
from jaxmp.parallel import context
from jaxmp.parallel.context import head_tail_order, ring_attention, ring_work, useful_pairs

B, H, K = 2, 2, 4
# Entries near zero (gradients that cancel) get an absolute tolerance: a few float32 ulps (1.2e-7) of
# the largest entries (about 2), as the ring sums the same terms in another order. Measured: 7e-8.
ATOL = 5e-7


SEQ = P(None, "context")


def mesh_of(parts: int) -> jax.sharding.Mesh:
    return jax.make_mesh((parts,), ("context",), (jax.sharding.AxisType.Auto,), devices=jax.devices()[:parts])


def ring(parts: int, *, poison: bool = False):
    """A fresh jitted ``(q, k, v, positions, cotangent) -> (o, (dq, dk, dv))`` over a ``context`` ring
    of ``parts`` devices, inputs in device order."""
    mesh = mesh_of(parts)

    def run(q, k, v, positions, ct):
        o, vjp = jax.vjp(lambda q, k, v: ring_attention(q, k, v, positions, "context", poison=poison), q, k, v)
        return o, vjp(ct)

    jitted = jax.jit(run)

    def on_mesh(*args):
        with jax.set_mesh(mesh):
            return jitted(*args)

    on_mesh.lower = lambda *args: _lowered(mesh, jitted, *args)
    return on_mesh


def _lowered(mesh, jitted, *args):
    with jax.set_mesh(mesh):
        return jitted.lower(*args)


def reference(q, k, v, ct):
    """Causal attention on one device in natural order, with the gradients of ``sum(o * ct)``."""
    mask = jnp.tril(jnp.ones((q.shape[1],) * 2, bool))[None, None]
    o, vjp = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask), q, k, v)
    return o, vjp(ct)


def inputs(seq_len: int, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), 4)
    return [jax.random.normal(key, (B, seq_len, H, K), dtype) for key in keys]


def check(order: np.ndarray, run, *, rtol=1e-5, atol=ATOL, dtype=jnp.float32):
    q, k, v, ct = inputs(len(order), dtype)
    o_ref, grads_ref = reference(*(x.astype(jnp.float32) for x in (q, k, v, ct)))
    o, grads = run(*(x[:, order] for x in (q, k, v)), order, ct[:, order])
    for got, want in zip((o, *grads), (o_ref, *grads_ref), strict=True):
        assert got.dtype == dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want[:, order], np.float32), rtol, atol)


def contiguous(seq_len: int, parts: int) -> np.ndarray:
    return np.arange(seq_len, dtype=np.int32)


@pytest.mark.parametrize(
    ("parts", "seq_len", "order"),
    [
        (2, 12, head_tail_order),
        (4, 24, contiguous),
        (4, 24, head_tail_order),
        (8, 40, contiguous),
        (8, 32, head_tail_order),
    ],
)
def test_matches_plain_attention(parts, seq_len, order):
    check(order(seq_len, parts), ring(parts))


def test_bfloat16_in_bfloat16_out():
    # Against the float32 reference on the same inputs (jax.nn.dot_product_attention itself rejects
    # bfloat16 under strict promotion); the tolerance is bfloat16's rounding of the outputs (2^-8).
    check(head_tail_order(8, 2), ring(2), rtol=5e-2, atol=5e-2, dtype=jnp.bfloat16)


def test_only_collective_permutes():
    """The compiled per-device program sends blocks around the ring and never holds a whole sequence."""
    sharding = jax.sharding.NamedSharding(mesh_of(4), SEQ)
    q, k, v, ct = (jax.device_put(x, sharding) for x in inputs(16))
    order = head_tail_order(16, 4)  # positions are not sent: each device looks up those of the block it holds
    hlo = ring(4).lower(q, k, v, order, ct).compile().as_text()
    assert "collective-permute" in hlo
    for other in ("all-gather", "all-reduce", "reduce-scatter", "all-to-all"):
        assert other not in hlo, other
    assert f"[{B},16,{H},{K}]" not in hlo and f"[{B},4,{H},{K}]" in hlo


def test_poisoned_receive_buffers_stay_unread():
    check(head_tail_order(16, 4), ring(4, poison=True))


def test_poison_shows_a_broken_ring(monkeypatch):
    """Negative control: drop the hop into device 1, so its receive buffers are read unwritten (the block
    it should get, device 0's, is the one its queries see; a hop into device 0 would bring a block its
    queries never see, which the ring skips unread)."""
    monkeypatch.setattr(context, "ring_perm", lambda size: [(i, (i + 1) % size) for i in range(1, size)])
    q, k, v, ct = inputs(8)
    order = np.arange(8, dtype=np.int32)
    o, grads = ring(2, poison=True)(q, k, v, order, ct)
    assert all(np.isnan(x).any() for x in (o, *grads))
    o, grads = ring(2)(q, k, v, order, ct)  # without poison, ppermute's zeros hide it
    assert all(np.isfinite(x).all() for x in (o, *grads))


def test_head_tail_order():
    order = head_tail_order(24, 3)
    assert sorted(order) == list(range(24)) and order.dtype == np.int32
    chunks = np.arange(24).reshape(6, 4)
    for r, held in enumerate(order.reshape(3, 2, 4)):
        np.testing.assert_array_equal(held, chunks[[r, 5 - r]])
    np.testing.assert_array_equal(head_tail_order(6, 1), np.arange(6))
    with pytest.raises(ConfigError, match="multiple of 2"):
        head_tail_order(20, 3)


def test_useful_pairs():
    balanced = useful_pairs(head_tail_order(64, 4).reshape(4, -1))
    assert len(set(balanced)) == 1 and balanced.sum() == 64 * 65 // 2
    skewed = useful_pairs(np.arange(64).reshape(4, -1))
    assert skewed.max() / skewed.mean() > 1.5 and skewed.sum() == balanced.sum()


def test_the_ring_skips_what_no_query_sees():
    """Head-tail: half of every other device's block and 3/4 of its own, the same on every device, in
    line with the useful work. Contiguous: later devices' blocks skipped whole, earlier ones computed
    whole: the last device computes 15 quarter-blocks of 4x4 pairs, the first 3."""
    balanced = ring_work(head_tail_order(32, 4).reshape(4, -1))
    assert (balanced == (3 + 2 * 3) * 4 * 4).all()
    contiguous = ring_work(np.arange(32).reshape(4, -1))
    np.testing.assert_array_equal(contiguous, [(4 * r + 3) * 16 for r in range(4)])
    assert (useful_pairs(np.arange(32).reshape(4, -1)) <= contiguous).all()
