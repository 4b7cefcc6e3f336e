"""Digests of a train state's arrays that do not depend on the mesh: a checkpoint is verified after it
is restored onto any mesh, with or without a pipeline.

How: each array is read as 32-bit words (a bfloat16 widened, a float64 split in two), and each word,
mixed with its position in the whole array, goes through a bijective integer hash (MurmurHash3's
finaliser); the digest is the wrapping uint32 sum of those hashes, in two lanes with different seeds.
A sum modulo 2**32 is exact and order-free, so every sharding of the array (each device summing its
own shard, XLA adding the partial sums) gives the same 64 bits. A change of any single word always
changes the digest (the hash is a bijection); other changes go unseen with probability about 2**-64.

Cost: one pass over the state on the devices. An array replicated over some mesh axes (parameters under
data parallelism) is first spread over them (a local slice, no communication), so each device hashes
only its own part instead of all of it.

Why not a file checksum: a state saved on ``data=2,tensor=2,pipe=2`` is read back onto ``pipe=4`` or one
device, as other chunks; only a digest of the array's values survives that, and it checks what the run
will train on, after every layer of storage has had its say.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxmp.parallel.sharding import path_name

_SEEDS = (0x9E3779B9, 0x7F4A7C15)


def _mix(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 that spreads every input bit."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _words(a: jax.Array) -> jax.Array:
    """``a``'s bits as uint32 words (a trailing axis of two for 8-byte types)."""
    size = np.dtype(a.dtype).itemsize
    if a.dtype == jnp.bool_:
        return a.astype(jnp.uint32)
    if size == 4:
        return jax.lax.bitcast_convert_type(a, jnp.uint32)
    if size < 4:
        unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
        return jax.lax.bitcast_convert_type(a, unsigned).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(a, jnp.uint32)  # 8 bytes: (..., 2)


def _position(shape: tuple[int, ...]) -> jax.Array:
    """Each element's row-major index in the whole array (wrapping at 2**32), as uint32."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


def _array_digest(a: jax.Array, spread: NamedSharding | None) -> jax.Array:
    words = _words(a)
    if spread is not None:
        extra = (None,) * (words.ndim - a.ndim)  # the two words of an 8-byte element stay together
        words = jax.lax.with_sharding_constraint(words, NamedSharding(spread.mesh, PartitionSpec(*spread.spec, *extra)))
    position = _position(words.shape)
    lanes = [jnp.sum(_mix(words ^ _mix(position ^ jnp.uint32(seed))), dtype=jnp.uint32) for seed in _SEEDS]
    return jnp.stack(lanes)


def _spread(a: jax.Array) -> NamedSharding | None:
    """``a``'s sharding with the mesh axes it is replicated over added to its largest unsplit dimension
    they divide (None: nothing to add)."""
    sharding = getattr(a, "sharding", None)
    if not isinstance(sharding, NamedSharding) or any(t != AxisType.Auto for t in sharding.mesh.axis_types):
        return None  # explicit axes take no sharding constraints: the digest is then computed as placed
    spec = [*sharding.spec, *(None,) * (a.ndim - len(sharding.spec))]
    used = {axis for part in spec if part for axis in (part if isinstance(part, tuple) else (part,))}
    free = tuple(axis for axis in sharding.mesh.axis_names if axis not in used and sharding.mesh.shape[axis] > 1)
    count = math.prod(sharding.mesh.shape[axis] for axis in free)
    for dim in sorted(range(a.ndim), key=lambda d: -a.shape[d]):
        if free and spec[dim] is None and a.shape[dim] % count == 0:
            spec[dim] = free
            return NamedSharding(sharding.mesh, PartitionSpec(*spec))
    return None


@functools.partial(jax.jit, static_argnums=1)
def _tree_digests(leaves, spreads):
    return [_array_digest(a, spread) for a, spread in zip(leaves, spreads, strict=True)]


def digests(tree) -> dict[str, str]:
    """The digest of every array of ``tree`` (global ``jax.Array``s, any sharding), by dotted name, as
    16 hex digits; every process gets the same."""
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(tree)[0], strict=True)
    flat = zip(paths, _tree_digests(list(leaves), tuple(map(_spread, leaves))), strict=True)
    out = {}
    for path, lanes in flat:
        hi, lo = (int(v) for v in np.asarray(lanes.addressable_data(0)))
        out[path_name(path)] = f"{hi:08x}{lo:08x}"
    return out


def first_mismatch(stored: dict[str, str], tree) -> str | None:
    """The name of the first array of ``tree`` whose digest differs from ``stored`` (None: all match)."""
    current = digests(tree)
    for name in sorted(current, key=lambda n: not n.startswith("params.")):
        if stored.get(name) != current[name]:
            return name
    return None
