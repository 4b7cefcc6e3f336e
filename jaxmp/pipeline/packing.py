"""Each stage's parameters on its own devices: the chunks' parameters packed into per-stage buffers.

Shapes: S = stages, N = the largest stage's elements per device in one buffer, ``tiles`` = the sizes of
the mesh axes that split a parameter (e.g. ``tensor``).

Why buffers: stages of different layers have parameter trees of different shapes, which cannot be one
array sharded over ``pipe``. So every stage's parameters are flattened into buffers ``[S, tiles..., N]``
sharded ``P("pipe", *tile axes)``, padded to the largest stage: a device holds exactly its stage's
parameters (plus padding), never the whole model's. A parameter split over mesh axes (Megatron's
``tensor``, FSDP's batch axes) is stored tile-major: its shard for mesh position ``i`` sits at
``[..., i, ...]``, so each device holds just its own shards, and unpacking (a reshape and a transpose)
gives XLA the parameter with its sharding, without moving data. Circular repeats store a device's
chunks in its own buffer, so no weight crosses devices during a step.

The shared region: a piece that every stage has (its stack's rows, the same count on each stage, at the
same place among the stage's chunks; on one stage, every piece) is stored first, at the same offsets on
every stage. The executor then unpacks it once per step, one program for all devices, and sums its
gradient in the layer tree (:meth:`shared_params`, :class:`GradSums`); the other pieces (``pre``,
``post``, layers of their own) follow, per stage.

The model's own layer order (the pure-dict tree of ``nnx.state``) stays the saved form: :meth:`pack`
and :meth:`unpack` convert, so checkpoints do not depend on the split, the placement or the mesh.

Tied parameters (one ``nnx.Param`` used by two parts: an LM head that reuses the embedding table) are
stored once in the saved form, but each stage that uses one needs it on its own devices: its alias gets
a slot of its own (on the first stage, when the head is on the last). After the executor,
:meth:`fold_tied_grads` adds each alias's gradient into the stored copy's and zeroes it, so the optimizer
sees the parameter once, with the sum over its uses; after the update, :meth:`sync_tied` copies the
stored value over the alias. Each moves one parameter-sized message per step between the two stages
(Megatron's embedding all-reduce moves the same); the alias's optimizer moments are wasted memory.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxmp.models.contract import ModelParts, Part, sub_params
from jaxmp.parallel.mesh import PIPE
from jaxmp.parallel.rules import as_axes


class Piece(NamedTuple):
    """A part run by a chunk; for a stack, the rows ``[first, end)`` of its layers."""

    part: Part
    rows: tuple[int, int] | None


class _Tile(NamedTuple):
    """How one parameter is laid out tile-major (module docstring)."""

    shape: tuple[int, ...]
    split_shape: tuple[int, ...]
    perm: tuple[int, ...]
    tile_axes: tuple[str, ...]
    tile_shape: tuple[int, ...]
    size: int  # elements per device
    spec: P  # the parameter's sharding

    def tile(self, a: jax.Array) -> jax.Array:
        return a.reshape(self.split_shape).transpose(self.perm).reshape(*self.tile_shape, self.size)

    def untile(self, t: jax.Array) -> jax.Array:
        rest = [self.split_shape[i] for i in self.perm[len(self.tile_axes) :]]
        inverse = [self.perm.index(i) for i in range(len(self.perm))]
        return t.reshape(*self.tile_shape, *rest).transpose(inverse).reshape(self.shape)


class Slot(NamedTuple):
    """Where one parameter of one chunk sits: piece, path inside the part, buffer and offset."""

    piece: int
    path: tuple
    buffer: str
    offset: int
    tile: _Tile


class ChunkLayout(NamedTuple):
    stage: int
    pieces: list[Piece]
    slots: list[Slot]
    shared: tuple = ()  # per piece: its signature if every stage has it at the same offsets, else None


class Buffer(NamedTuple):
    tile_axes: tuple[str, ...]
    dtype: jnp.dtype
    size: int  # N

    def spec(self) -> P:
        return P(PIPE, *self.tile_axes, None)


def chunk_pieces(parts: ModelParts, first: int, end: int, *, with_pre: bool, with_post: bool) -> list[Piece]:
    """The parts that units ``[first, end)`` cover, with ``pre`` and ``post`` where the chunk has them."""
    pieces = [Piece(parts.pre, None)] if with_pre and parts.pre is not None else []
    for u, (layer, row) in enumerate(parts.units):
        if first <= u < end:
            part = parts.layers[layer]
            if part.depth is None:
                pieces.append(Piece(part, None))
            elif pieces and pieces[-1].part is part:
                pieces[-1] = Piece(part, (pieces[-1].rows[0], row + 1))
            else:
                pieces.append(Piece(part, (row, row + 1)))
    if with_post and parts.post is not None:
        pieces.append(Piece(parts.post, None))
    return pieces


class Packing:
    """The per-stage buffers of one model, split and placement (module docstring).

    Args:
      parts: the model's parts.
      abstract: the model's parameters (pure dict of arrays or shape structs), layer order.
      specs: a ``PartitionSpec`` per parameter (same tree), without ``pipe``.
      bounds: ``[(first unit, end unit)]`` per chunk.
      chunk_stage: the device along ``pipe`` of each chunk.
      mesh: the mesh.
    """

    def __init__(self, parts: ModelParts, abstract, specs, bounds, chunk_stage, mesh):
        self.parts, self.stages, self.mesh = parts, mesh.shape[PIPE], mesh
        abstract, specs = parts.with_ties(abstract), parts.with_ties(specs)
        self.chunk_stage = tuple(chunk_stage)
        last = len(bounds) - 1
        pieces_of = [
            chunk_pieces(parts, first, end, with_pre=c == 0, with_post=c == last)
            for c, (first, end) in enumerate(bounds)
        ]
        local = _local_index(self.chunk_stage)
        shared = _shared_signatures(pieces_of, local, self.chunk_stage, self.stages)
        used: dict[tuple[int, str], int] = {}  # (stage, buffer) -> elements placed so far
        kinds: dict[str, tuple] = {}  # buffer name -> (dtype, tile axes)
        self.shared_size: dict[str, int] = {}  # per buffer: the elements of the shared region
        self.shared: dict[tuple, list[Slot]] = {}  # signature -> the piece's slots (piece index 0)
        for sig, piece in _by_signature(pieces_of, local).items():
            if sig in shared:
                self.shared[sig] = self._place(piece, 0, abstract, specs, mesh, self.shared_size, kinds)
        self.chunks: list[ChunkLayout] = []
        for c, pieces in enumerate(pieces_of):
            stage = self.chunk_stage[c]
            offsets = {name: used.get((stage, name), self.shared_size.get(name, 0)) for name in kinds}
            slots, signatures = [], []
            for i, piece in enumerate(pieces):
                sig = _signature(local[c], piece)
                signatures.append(sig if sig in shared else None)
                if sig in shared:
                    slots += [slot._replace(piece=i) for slot in self.shared[sig]]
                else:
                    slots += self._place(piece, i, abstract, specs, mesh, offsets, kinds)
            used.update({(stage, name): n for name, n in offsets.items()})
            self.chunks.append(ChunkLayout(stage, pieces, slots, tuple(signatures)))
        self.buffers = {
            name: Buffer(
                axes, dtype, max([self.shared_size.get(name, 0), *(n for (_, b), n in used.items() if b == name)])
            )
            for name, (dtype, axes) in sorted(kinds.items())
        }
        self._stage_elements = used
        self.tied = [self._tied_copy(alias, stored) for alias, stored in parts.ties]

    def _tied_copy(self, alias: tuple, stored: tuple) -> TiedCopy:
        where = {}
        for chunk in self.chunks:
            for slot in chunk.slots:
                where[(*chunk.pieces[slot.piece].part.key, *slot.path)] = (chunk.stage, slot)
        (alias_stage, alias_slot), (stored_stage, stored_slot) = where[alias], where[stored]
        return TiedCopy(
            stored_slot.buffer,
            stored_slot.tile.size,
            (stored_stage, stored_slot.offset),
            (alias_stage, alias_slot.offset),
        )

    @staticmethod
    def _place(piece: Piece, index: int, abstract, specs, mesh, offsets: dict, kinds: dict) -> list[Slot]:
        """Slots for ``piece``'s parameters at the next free ``offsets`` of their buffers (updated)."""
        slots = []
        for path, leaf, spec in _leaves(abstract, specs, piece):
            tile = _tile_of(leaf.shape, spec, mesh)
            name = _buffer_name(leaf.dtype, tile.tile_axes)
            offset = offsets.get(name, 0)
            offsets[name] = offset + tile.size
            slots.append(Slot(index, path, name, offset, tile))
            kinds[name] = (leaf.dtype, tile.tile_axes)
        return slots

    def buffer_specs(self) -> dict[str, P]:
        return {name: b.spec() for name, b in self.buffers.items()}

    def abstract_buffers(self) -> dict[str, jax.ShapeDtypeStruct]:
        return {
            name: jax.ShapeDtypeStruct((self.stages, *(self.mesh.shape[a] for a in b.tile_axes), b.size), b.dtype)
            for name, b in self.buffers.items()
        }

    def pack(self, params) -> dict[str, jax.Array]:
        """Layer-order parameters -> per-stage buffers (under jit: out_shardings place them)."""
        params = self.parts.with_ties(params)
        pieces: dict[tuple[int, str], list[tuple[int, jax.Array]]] = {}
        for chunk in self.chunks:
            for slot in chunk.slots:
                leaf = _leaf(params, chunk.pieces[slot.piece], slot.path)
                pieces.setdefault((chunk.stage, slot.buffer), []).append((slot.offset, slot.tile.tile(leaf)))
        out = {}
        for name, b in self.buffers.items():
            tiles = tuple(self.mesh.shape[a] for a in b.tile_axes)
            rows = []
            for s in range(self.stages):
                parts = [tile for _, tile in sorted(pieces.get((s, name), []), key=lambda p: p[0])]
                flat = jnp.concatenate(parts, axis=-1) if parts else jnp.zeros((*tiles, 0), b.dtype)
                rows.append(jnp.pad(flat, [(0, 0)] * len(tiles) + [(0, b.size - flat.shape[-1])]))
            out[name] = jnp.stack(rows)
        return out

    def unpack(self, buffers) -> dict:
        """Per-stage buffers -> layer-order parameters (the inverse of :meth:`pack`)."""
        found: dict[tuple, list[tuple[int, jax.Array]]] = {}
        for chunk in self.chunks:
            for slot in chunk.slots:
                piece = chunk.pieces[slot.piece]
                flat = buffers[slot.buffer][chunk.stage][..., slot.offset : slot.offset + slot.tile.size]
                key = (*piece.part.key, *slot.path)
                found.setdefault(key, []).append((piece.rows[0] if piece.rows else 0, slot.tile.untile(flat)))
        tree: dict = {}
        for key, runs in found.items():
            runs.sort(key=lambda run: run[0])
            value = runs[0][1] if len(runs) == 1 else jnp.concatenate([a for _, a in runs])
            _set(tree, key, value)
        return self.parts.without_ties(tree)

    def fold_tied_grads(self, grads: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Each alias's gradient added into its stored parameter's, and zeroed: the optimizer sees a
        tied parameter once, with the sum over its uses (a global norm counts it once)."""
        return self._move_tied(grads, fold=True)

    def sync_tied(self, buffers: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Each alias set to its stored parameter's value (after an update: every use reads the same)."""
        return self._move_tied(buffers, fold=False)

    def _move_tied(self, buffers: dict[str, jax.Array], *, fold: bool) -> dict[str, jax.Array]:
        """Per tied parameter: one region sent between its two stages (alias -> stored to fold,
        stored -> alias to sync), inside a ``shard_map`` over ``pipe``: one message of the parameter's
        size per tile, never a gather of the buffers."""
        if not self.tied:
            return buffers

        def body(local: dict) -> dict:
            stage, out = jax.lax.axis_index(PIPE), dict(local)
            for copy in self.tied:
                (src_stage, src), (dst_stage, dst) = (copy.alias, copy.stored) if fold else (copy.stored, copy.alias)
                value = out[copy.buffer]
                sent = jax.lax.slice_in_dim(value, src, src + copy.size, axis=-1)
                if src_stage != dst_stage:
                    sent = jax.lax.ppermute(sent, PIPE, [(src_stage, dst_stage)])
                old = jax.lax.slice_in_dim(value, dst, dst + copy.size, axis=-1)
                new = jnp.where(stage == dst_stage, old + sent if fold else sent, old)
                value = jax.lax.dynamic_update_slice_in_dim(value, new, dst, axis=-1)
                if fold:
                    old = jax.lax.slice_in_dim(value, src, src + copy.size, axis=-1)
                    new = jnp.where(stage == src_stage, jnp.zeros_like(old), old)
                    value = jax.lax.dynamic_update_slice_in_dim(value, new, src, axis=-1)
                out[copy.buffer] = value
            return out

        specs = {name: P(PIPE) for name in buffers}
        return jax.shard_map(body, mesh=self.mesh, in_specs=(specs,), out_specs=specs, axis_names={PIPE})(buffers)

    def shared_params(self, local, manual: frozenset[str]) -> dict:
        """Inside the executor: the shared pieces' parameters (signature -> tree), unpacked once per step.

        Why: every stage holds a shared piece (its stack rows, the same count on every stage) at the same
        offsets, so one unpacking serves every action of the step, and its gradient can be summed in the
        layer tree, where an add costs what it costs in a plain step."""
        return {sig: self._unpack(slots, local, manual) for sig, slots in self.shared.items()}

    def chunk_params(self, c: int, local, manual: frozenset[str], shared: dict) -> list:
        """Inside the executor: chunk ``c``'s parameters, one tree per piece: the shared pieces from
        ``shared`` (:meth:`shared_params`), the others sliced from this device's buffers
        (``[1, tiles..., N]``, every manual tile axis already gathered)."""
        chunk = self.chunks[c]
        return [
            shared[sig] if sig is not None else self._unpack([s for s in chunk.slots if s.piece == i], local, manual)
            for i, sig in enumerate(chunk.shared)
        ]

    def _unpack(self, slots: list[Slot], local, manual: frozenset[str]) -> dict:
        tree: dict = {}
        for slot in slots:
            flat = self._pinned(slot.buffer, local[slot.buffer], manual)[
                0, ..., slot.offset : slot.offset + slot.tile.size
            ]
            leaf = slot.tile.untile(flat)
            # pinned even when whole: else XLA may split a bias like the activation it is added to, and
            # split the flat buffer with it, whose unaligned slices then cost collective-permutes inside
            # a stage's branch (a deadlock on XLA:CPU, where a permute waits for every device)
            leaf = jax.lax.with_sharding_constraint(leaf, P(*(_without(entry, manual) for entry in slot.tile.spec)))
            _set(tree, slot.path, leaf)
        return tree

    def _pinned(self, name: str, value: jax.Array, manual: frozenset[str]) -> jax.Array:
        """A local buffer ``[1, tiles..., N]`` split over its automatic tile axes only, never along N."""
        axes = [None if a in manual else a for a in self.buffers[name].tile_axes]
        return jax.lax.with_sharding_constraint(value, P(None, *axes, None))

    def zero_grads(self, shared: dict, local: dict) -> GradSums:
        """Running gradient sums at zero: trees for the shared pieces, flat for the rest of each buffer."""
        rest = {}
        for name, value in local.items():
            rest[name] = jnp.zeros((*value.shape[:-1], value.shape[-1] - self.shared_size.get(name, 0)), value.dtype)
        return GradSums(jax.tree.map(jnp.zeros_like, shared), rest)

    def add_chunk_grads(self, c: int, sums: GradSums, grads: list, manual: frozenset[str]) -> GradSums:
        """Inside the executor: add chunk ``c``'s parameter cotangents (one tree per piece, as
        :meth:`chunk_params` gave them) into this device's running sums.

        Shared pieces add in the tree. The others: a chunk's slots in one buffer are contiguous, so each
        buffer gets one read-add-write of the chunk's segment (per-slot updates each cost XLA:CPU a copy
        of the whole buffer).
        """
        chunk = self.chunks[c]
        shared, rest = dict(sums.shared), dict(sums.rest)
        by_buffer: dict[str, list[Slot]] = {}
        for i, sig in enumerate(chunk.shared):
            if sig is not None:
                shared[sig] = jax.tree.map(lambda a, g: a + g.astype(a.dtype), shared[sig], grads[i])
        for slot in chunk.slots:
            if chunk.shared[slot.piece] is None:
                by_buffer.setdefault(slot.buffer, []).append(slot)
        for name, slots in by_buffer.items():
            total = rest[name]
            parts = [slot.tile.tile(_get(grads[slot.piece], slot.path)).astype(total.dtype) for slot in slots]
            first = slots[0].offset - self.shared_size.get(name, 0)
            assert all(a.offset + a.tile.size == b.offset for a, b in zip(slots, slots[1:], strict=False))
            segment = jnp.concatenate(parts, axis=-1)[None] if len(parts) > 1 else parts[0][None]
            segment, total = self._pinned(name, segment, manual), self._pinned(name, total, manual)
            old = jax.lax.slice_in_dim(total, first, first + segment.shape[-1], axis=-1)
            rest[name] = jax.lax.dynamic_update_slice_in_dim(total, old + segment, first, axis=-1)
        return GradSums(shared, rest)

    def packed_grads(self, sums: GradSums, manual: frozenset[str]) -> dict[str, jax.Array]:
        """The running sums as buffers ``[1, tiles..., N]`` (the shared region first, as packed)."""
        regions: dict[str, list[jax.Array]] = {name: [] for name in sums.rest}
        for sig, slots in self.shared.items():
            for slot in slots:
                regions[slot.buffer].append(slot.tile.tile(_get(sums.shared[sig], slot.path))[None])
        return {
            name: self._pinned(name, jnp.concatenate([*regions[name], rest], axis=-1), manual)
            for name, rest in sums.rest.items()
        }

    def stage_table(self) -> list[dict]:
        """Per stage: its chunks' layers and parameter bytes per device (unpadded, and as stored)."""
        rows = []
        for s in range(self.stages):
            chunks = [c for c, chunk in enumerate(self.chunks) if chunk.stage == s]
            layers = [", ".join(_piece_name(p) for p in self.chunks[c].pieces) for c in chunks]
            used = sum(self._stage_elements.get((s, n), 0) * b.dtype.itemsize for n, b in self.buffers.items())
            stored = sum(b.size * b.dtype.itemsize for b in self.buffers.values())
            rows.append({"stage": s, "chunks": chunks, "layers": " | ".join(layers), "bytes": used, "stored": stored})
        return rows


class TiedCopy(NamedTuple):
    """Where a tied parameter's stored copy and its alias sit: ``(stage, offset)`` each, one buffer."""

    buffer: str
    size: int  # elements per device
    stored: tuple[int, int]
    alias: tuple[int, int]


class GradSums(NamedTuple):
    """A stage's running gradient sums: shared pieces as trees, the rest of each buffer flat."""

    shared: dict  # signature -> tree
    rest: dict  # buffer -> [1, tiles..., N - shared size]


def _signature(local: int, piece: Piece) -> tuple:
    """What makes a piece the same on every stage: the chunk's place among its stage's chunks, the part
    and, for a stack, its number of rows."""
    return (local, piece.part.key, None if piece.rows is None else piece.rows[1] - piece.rows[0])


def _local_index(chunk_stage: tuple[int, ...]) -> list[int]:
    """Each chunk's place among the chunks of its stage (0 for the first it runs)."""
    seen: dict[int, int] = {}
    out = []
    for stage in chunk_stage:
        out.append(seen.get(stage, 0))
        seen[stage] = out[-1] + 1
    return out


def _by_signature(pieces_of: list[list[Piece]], local: list[int]) -> dict[tuple, Piece]:
    """Every signature, in chunk order, with the first piece that has it."""
    out: dict[tuple, Piece] = {}
    for c, pieces in enumerate(pieces_of):
        for piece in pieces:
            out.setdefault(_signature(local[c], piece), piece)
    return out


def _shared_signatures(pieces_of: list[list[Piece]], local: list[int], chunk_stage, stages: int) -> set[tuple]:
    """The signatures found on every stage (a stack split evenly; on one stage, every piece)."""
    found: dict[tuple, set[int]] = {}
    for c, pieces in enumerate(pieces_of):
        for piece in pieces:
            found.setdefault(_signature(local[c], piece), set()).add(chunk_stage[c])
    return {sig for sig, where in found.items() if len(where) == stages}


def _piece_name(piece: Piece) -> str:
    if piece.rows is None:
        return piece.part.name
    first, end = piece.rows
    return f"{piece.part.name}[{first}]" if end == first + 1 else f"{piece.part.name}[{first}:{end}]"


def _leaves(abstract, specs, piece: Piece):
    """``(path inside the part, leaf, spec)`` of a piece's parameters, stack rows sliced."""
    values = sub_params(abstract, piece.part.key)
    spec_tree = sub_params(specs, piece.part.key)
    flat = jax.tree_util.tree_flatten_with_path(values)[0]
    spec_flat = jax.tree.leaves(spec_tree, is_leaf=lambda x: isinstance(x, P))
    for (path, leaf), spec in zip(flat, spec_flat, strict=True):
        keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        shape = leaf.shape
        if piece.rows is not None:
            shape = (piece.rows[1] - piece.rows[0], *shape[1:])
        yield keys, jax.ShapeDtypeStruct(shape, leaf.dtype), spec


def piece_params(params, piece: Piece):
    """A piece's parameters out of the layer-order tree (its rows, for a stack); shapes in, shapes out."""
    values = sub_params(params, piece.part.key)
    if piece.rows is None:
        return values
    first, end = piece.rows

    def rows(a):
        if isinstance(a, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct((end - first, *a.shape[1:]), a.dtype)
        return a[first:end]

    return jax.tree.map(rows, values)


def _leaf(params, piece: Piece, path: tuple):
    value = sub_params(params, (*piece.part.key, *path))
    return value[piece.rows[0] : piece.rows[1]] if piece.rows is not None else value


def _get(tree, key: tuple):
    for k in key:
        tree = tree[k]
    return tree


def _set(tree: dict, key: tuple, value) -> None:
    for k in key[:-1]:
        tree = tree.setdefault(k, {})
    tree[key[-1]] = value


def _without(entry, axes) -> str | tuple[str, ...] | None:
    kept = tuple(a for a in as_axes(entry) if a not in axes)
    return kept[0] if len(kept) == 1 else (kept or None)


def _tile_of(shape: tuple[int, ...], spec: P, mesh) -> _Tile:
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    split_shape, names = [], []
    for dim, entry in zip(shape, entries, strict=True):
        axes = [a for a in as_axes(entry) if mesh.shape[a] > 1]
        for a in axes:
            split_shape.append(mesh.shape[a])
            names.append(a)
        split_shape.append(dim // math.prod(mesh.shape[a] for a in axes))
        names.append(None)
    tile_axes = tuple(a for a in mesh.axis_names if a in names)
    perm = tuple([names.index(a) for a in tile_axes] + [i for i, n in enumerate(names) if n is None])
    tile_shape = tuple(mesh.shape[a] for a in tile_axes)
    size = math.prod(shape) // max(1, math.prod(tile_shape))
    return _Tile(tuple(shape), tuple(split_shape), perm, tile_axes, tile_shape, size, P(*entries))


def _buffer_name(dtype, tile_axes: tuple[str, ...]) -> str:
    return str(jnp.dtype(dtype)) + ("@" + ",".join(tile_axes) if tile_axes else "")


def print_stage_report(packing: Packing, console=None) -> None:
    """Print each stage's chunks, layers and parameter bytes per device as a rich table."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="pipeline stages (parameters per device)", title_justify="left")
    for column in ("stage", "chunks", "layers", "bytes/device", "padding/device"):
        table.add_column(column, justify="right" if "/device" in column else "left")
    for row in packing.stage_table():
        chunks = ",".join(map(str, row["chunks"]))
        padding = row["stored"] - row["bytes"]
        table.add_row(str(row["stage"]), chunks, row["layers"], f"{row['bytes']:,}", f"{padding:,}")
    console.print(table)
