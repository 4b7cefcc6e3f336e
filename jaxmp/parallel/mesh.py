"""Device meshes from a short text spec: ``"data=2,context=2,tensor=2"``, and the one table of mesh axes.

:data:`AXIS_ROLES` says what each axis splits and fixes their order; every other module reads it (mesh
parsing, the rules tables, FSDP, the pipeline executor, the planner, ``analyze``) instead of spelling the
axes out. A jaxmp mesh always has all four axes in that order; a spec names them in any order
(``pipe=2,data=2`` is ``data=2,pipe=2``), an axis left out has size 1 and one axis may be ``-1`` (fill the
remaining devices). The mesh uses ``AxisType.Auto`` on every axis: current JAX
defaults to Explicit axes, which raise on ambiguous matmuls instead of letting XLA choose where the
collectives go, and choosing them is XLA's job here.
"""

from __future__ import annotations

import dataclasses
import math
import os

from jaxmp.config import ConfigError
from jaxmp.speech import speaks_python

# Each mesh axis and what it splits, in mesh order (devices are laid out with the last axis varying fastest).
AXIS_ROLES: dict[str, str] = {
    "data": "batch",  # examples: replicas of the weights, gradients reduced once per step
    "context": "sequence",  # a sequence's tokens: attention exchanges keys and values over it
    "tensor": "weights",  # Megatron's column/row splits, heads and vocabulary
    "pipe": "stages",  # the layers, cut into pipeline stages
}
AXES = tuple(AXIS_ROLES)


def axes_with_role(role: str) -> tuple[str, ...]:
    """The mesh axes whose role is ``role`` (``"batch"``, ``"sequence"``, ``"weights"``, ``"stages"``)."""
    return tuple(axis for axis, axis_role in AXIS_ROLES.items() if axis_role == role)


# Each axis by role: other modules name an axis through these, so the table stays the one place that spells them.
DATA, CONTEXT, TENSOR, PIPE = (axes_with_role(role)[0] for role in ("batch", "sequence", "weights", "stages"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshShape:
    """Sizes of the mesh axes, by name only (``MeshShape(data=2, pipe=4)``); iterating gives them in mesh
    order. Keyword-only: a positional ``MeshShape(2, 4)`` would silently change meaning as axes are added."""

    data: int = 1
    context: int = 1
    tensor: int = 1
    pipe: int = 1

    def __iter__(self):
        return iter(self.sizes)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, axis) for axis in AXES)

    @property
    def size(self) -> int:
        return math.prod(self.sizes)

    def __str__(self) -> str:
        """``data=2,tensor=2,pipe=2``: every axis, but ``context`` only where it splits (a model without
        a sequence reads as it always did)."""
        return ",".join(f"{axis}={size}" for axis, size in zip(AXES, self, strict=True) if axis != CONTEXT or size > 1)

    @classmethod
    def of(cls, mesh) -> MeshShape:
        """The shape of a ``jax.sharding.Mesh`` (its axes all in :data:`AXES`)."""
        return cls(**dict(mesh.shape))


@speaks_python
def parse_mesh(spec: str, num_devices: int) -> MeshShape:
    """Parse ``"data=2,context=2,tensor=-1"`` into a :class:`MeshShape` that uses exactly ``num_devices``; axes are
    matched by name, so their order in ``spec`` does not matter.

    Raises:
      ConfigError: unknown or repeated axis, a size that is not a positive integer (or one ``-1``),
        or sizes whose product is not the device count.
    """
    sizes: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in AXES:
            raise ConfigError(f"--mesh item {item!r} is not AXIS=SIZE with AXIS one of {', '.join(AXES)}.")
        if name in sizes:
            raise ConfigError(f"--mesh names axis {name!r} twice.")
        try:
            size = int(value)
        except ValueError:
            raise ConfigError(f"--mesh size {value.strip()!r} for {name} is not an integer.") from None
        if size == 0 or size < -1:
            raise ConfigError(f"--mesh size {size} for {name} must be positive or -1 (fill).")
        sizes[name] = size
    if not sizes:
        raise ConfigError(f"--mesh {spec!r} names no axis; e.g. data=2,tensor=2,pipe=2.")
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ConfigError(f"--mesh may set only one axis to -1, got {', '.join(fill)}.")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if num_devices % fixed:
            raise ConfigError(
                f"--mesh {spec!r}: {num_devices} devices cannot be split evenly over fixed axes of product {fixed}."
            )
        sizes[fill[0]] = num_devices // fixed
    shape = MeshShape(**sizes)
    if shape.size != num_devices:
        raise ConfigError(
            f"--mesh {spec!r} needs {shape.size} devices but {num_devices} are available "
            f"(use --cpu-devices {shape.size} to simulate them on CPU)."
        )
    return shape


@speaks_python
def simulate_cpu_devices(count: int) -> None:
    """Make JAX's CPU backend expose ``count`` devices; must run before JAX initialises a backend. If JAX
    already started with at least ``count`` devices, nothing changes: a mesh uses the first it needs.

    Raises:
      ConfigError: when JAX has already started with fewer devices.
    """
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        if jax.device_count() >= count:
            return
        raise ConfigError(
            f"--cpu-devices {count} came too late: JAX already started with {jax.device_count()} devices."
        )
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)
    os.environ.setdefault("PJRT_NPROC", str(cpu_threads(count)))


def cpu_threads(devices: int) -> int:
    """Threads for XLA:CPU's pools when ``devices`` are simulated: twice the devices, at least 16.

    Why: XLA sizes its thread pools to ``max(cores, devices)``, and a device waiting in a collective holds
    a pool thread (sometimes two: a loop's collective and the next one overlap). With 8 devices on a
    2-core machine every thread can be waiting while the one device they wait for has its next step queued
    behind them: a hang that XLA aborts after a minute ("7 of 8 arrived"). ``PJRT_NPROC`` sets the pool
    size; spare threads make that starvation unlikely (it cannot be ruled out while collectives block)."""
    return max(16, 2 * devices)


@speaks_python
def build_mesh(shape: MeshShape, devices=None):
    """A ``jax.sharding.Mesh`` with the axes of :data:`AXES` (all ``AxisType.Auto``).

    Args:
      shape: axis sizes.
      devices: devices to use (default: the first ``shape.size`` of ``jax.devices()``); tests pass one
        device to build the single-device reference next to an 8-device mesh.
    """
    import jax
    from jax.sharding import AxisType

    if devices is None:
        devices = jax.devices()[: shape.size]
    if len(devices) < shape.size:
        raise ConfigError(
            f"the mesh {shape} needs {shape.size} devices, JAX has {len(devices)}; on CPU, "
            f"--cpu-devices {shape.size} simulates them (before JAX starts)."
        )
    return jax.make_mesh(tuple(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=list(devices))


@speaks_python
def mesh_from_spec(spec: str, devices=None):
    """Parse ``spec`` against the available devices and build the mesh: a spec of fixed sizes on the
    first devices it needs (``tensor=2`` on 8 devices uses 2), a ``-1`` axis filling all of them."""
    import jax

    devices = jax.devices() if devices is None else devices
    sizes = [item.partition("=")[2].strip() for item in spec.split(",")]
    if "-1" not in sizes and jax.process_count() == 1:  # several processes: every one's devices take part
        try:
            needed = math.prod(int(size) for size in sizes)
        except ValueError:  # parse_mesh names the bad item
            needed = len(devices)
        if 0 < needed < len(devices):
            devices = devices[:needed]
    return build_mesh(parse_mesh(spec, len(devices)), devices)


def run_mesh(spec: str, cpu_devices: int | None = None):
    """The mesh of a run (``--mesh``), on the first ``--cpu-devices`` devices when that is given (a
    process that already has more, e.g. a test's 8, runs a 2-device command as written). With several
    processes ``--cpu-devices`` counts each one's own, and the mesh spans them all."""
    import jax

    devices = jax.devices()
    if cpu_devices and jax.process_count() == 1:
        devices = devices[:cpu_devices]
    return mesh_from_spec(spec, devices)


@speaks_python
def as_mesh(mesh):
    """A jaxmp mesh from a spec (``"data=2,tensor=4"``) or a ``jax.sharding.Mesh`` of your own.

    A ``Mesh`` whose axes are some of :data:`AXES`, in that order, gets the others as size-1 axes
    (``jax.make_mesh((8,), ("data",))`` works); its devices keep their order. Any other axis names are a
    ``ConfigError``: map your model's logical names to jaxmp's axes in the rules table instead.
    """
    import jax
    from jax.sharding import AxisType

    if isinstance(mesh, str):
        return mesh_from_spec(mesh)
    if not isinstance(mesh, jax.sharding.Mesh):
        raise ConfigError(
            f"expected a mesh spec such as 'data=2,tensor=4' or a jax.sharding.Mesh, got {type(mesh).__name__}."
        )
    names = tuple(mesh.axis_names)
    if names == AXES and all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    if not set(names) <= set(AXES) or list(names) != [a for a in AXES if a in names]:
        raise ConfigError(
            f"mesh axes {names}: jaxmp meshes have the axes {', '.join(AXES)} (in that order, any may be left "
            "out); build one with jaxmp.mesh_from_spec('data=2,tensor=4') and map your logical names to those "
            "axes in rules."
        )
    sizes = tuple(mesh.shape.get(a, 1) for a in AXES)
    return jax.sharding.Mesh(mesh.devices.reshape(sizes), AXES, axis_types=(AxisType.Auto,) * len(AXES))
