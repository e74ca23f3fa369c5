"""Placement over a ``jax.sharding.Mesh`` with named axes ``data``, ``fsdp`` and ``model``.

The batch is split over ``(data, fsdp)``; parameters, their EMA and the optimizer state
follow one table of partitioning rules (:func:`partition_spec`), so a model larger than one
device trains under plain ``jax.jit`` with in/out shardings and the compiler inserts every
collective:

* **FSDP** (fully sharded data parallelism, ZeRO-3 of Rajbhandari et al. 2020): every
  floating-point array is split along ``fsdp`` on its largest dimension that the axis
  divides, and XLA gathers each layer's weights where they are used and reduce-scatters
  their gradients.
* **Tensor parallelism** (Megatron-LM, Shoeybi et al. 2019): the rules of
  :data:`TENSOR_PARALLEL_RULES` split the attention and MLP of a transformer block along
  ``model``: the first linear map by output features (column parallel), the second by input
  features (row parallel), so each device computes its own heads and its own slice of the
  hidden layer.

The default mesh, all devices on ``data`` (``fsdp = model = 1``), replicates the state and
is plain data parallelism. The same code serves one device, the devices of a host, and every
device of a multi-process job (after ``jax.distributed.initialize``): each process
contributes its local slice of the global batch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "BATCH_AXES",
    "DATA_AXIS",
    "FSDP_AXIS",
    "MESH_AXES",
    "MODEL_AXIS",
    "TENSOR_PARALLEL_RULES",
    "batch_sharding",
    "bytes_per_device",
    "check_rules",
    "make_mesh",
    "mesh_shape",
    "partition_rules",
    "partition_spec",
    "replicated",
    "shard_batch",
    "state_shardings",
]

DATA_AXIS, FSDP_AXIS, MODEL_AXIS = MESH_AXES = ("data", "fsdp", "model")
#: The axes the batch is split over (FSDP is data parallelism whose state is sharded too).
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)

#: ``(regex, spec)``: an array whose path (``"params/block0/attention/qkv/kernel"``) matches
#: ``regex`` is split as ``spec`` says, one mesh axis (or ``None``) per dimension. First match wins.
#: Column-parallel input maps and row-parallel output maps of the attention and MLP of
#: :class:`~difflax.models.DiT` (and the U-Net's attention), and of the diffusers-layout
#: :class:`~difflax.models.DiTTransformer2D`.
TENSOR_PARALLEL_RULES = (
    (r"attention/qkv/kernel$", (None, MODEL_AXIS)),
    (r"attention/qkv/bias$", (MODEL_AXIS,)),
    (r"attention/proj/kernel$", (MODEL_AXIS, None)),
    (r"mlp_in/kernel$", (None, MODEL_AXIS)),
    (r"mlp_in/bias$", (MODEL_AXIS,)),
    (r"mlp_out/kernel$", (MODEL_AXIS, None)),
    (r"attn1\.to_[qkv]/kernel$", (None, MODEL_AXIS)),
    (r"attn1\.to_[qkv]/bias$", (MODEL_AXIS,)),
    (r"attn1\.to_out\.0/kernel$", (MODEL_AXIS, None)),
    (r"ff\.net\.0\.proj/kernel$", (None, MODEL_AXIS)),
    (r"ff\.net\.0\.proj/bias$", (MODEL_AXIS,)),
    (r"ff\.net\.2/kernel$", (MODEL_AXIS, None)),
)


def mesh_shape(shape: Mapping[str, int] | None, device_count: int) -> dict[str, int]:
    """Sizes of the axes ``data``, ``fsdp``, ``model`` from ``shape`` (``config.mesh``) for ``device_count`` devices.

    Missing axes have size 1, except ``data``, which defaults to ``-1`` unless another axis
    is: one axis may be ``-1``, the devices left over by the others. ``None`` is all devices
    on ``data``.
    """
    given = dict(shape or {})
    unknown = sorted(set(given) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"config.mesh names unknown axes {unknown}; the axes are {list(MESH_AXES)}.")
    sizes = {DATA_AXIS: 1 if -1 in given.values() else -1, FSDP_AXIS: 1, MODEL_AXIS: 1, **given}
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or not (size >= 1 or size == -1):
            raise ValueError(f"config.mesh.{name} = {size!r} is not allowed: it must be an integer >= 1, or -1.")
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(f"config.mesh = {given} has several axes of size -1 ({rest}); at most one is allowed.")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if device_count % fixed or (not rest and fixed != device_count):
        need = (
            f"the sizes other than -1 multiply to {fixed}, which must divide"
            if rest
            else f"the sizes multiply to {fixed}, not"
        )
        raise ValueError(f"config.mesh = {given} does not fit {device_count} devices: {need} {device_count}.")
    if rest:
        sizes[rest[0]] = device_count // fixed
    return sizes


def make_mesh(devices=None, shape: Mapping[str, int] | None = None) -> Mesh:
    """A ``(data, fsdp, model)`` mesh over ``devices`` (default: every device of every process).

    ``shape`` is ``config.mesh`` (see :func:`mesh_shape`); the default puts every device on ``data``.
    """
    devices = jax.devices() if devices is None else list(devices)
    sizes = mesh_shape(shape, len(devices))
    grid = mesh_utils.create_device_mesh(tuple(sizes[a] for a in MESH_AXES), devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) dimension split over ``data`` and ``fsdp``."""
    return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch, mesh: Mesh):
    """Assemble global arrays, split as :func:`batch_sharding`, from this process's local slice of the batch."""
    sharding = batch_sharding(mesh)
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    size = max(shards // jax.process_count(), 1)

    def put(x):
        x = np.asarray(x)
        if x.shape[0] % size:
            raise ValueError(
                f"the per-process batch {x.shape[0]} must be divisible by this process's share {size} of the batch "
                f"shards (mesh axes data x fsdp = {shards})."
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)


def _spec_axes(entry) -> tuple:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _drop_unit_axes(entry, sizes: Mapping[str, int]):
    """A spec entry without the mesh axes of size 1 (they split nothing): ``None``, one axis, or several."""
    axes = tuple(a for a in _spec_axes(entry) if sizes[a] > 1)
    return None if not axes else axes[0] if len(axes) == 1 else axes


def check_rules(rules: Sequence) -> None:
    """Raise ``ValueError`` unless ``rules`` is a sequence of ``(regex, spec)`` over known mesh axes."""
    for rule in rules:
        if not (isinstance(rule, Sequence) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(f"partition rule {rule!r} is not allowed: it must be a pair (regex, spec).")
        pattern, spec = rule
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"partition rule {rule!r} has an invalid regex: {err}.") from None
        if isinstance(spec, str) or not isinstance(spec, Sequence):
            raise ValueError(f"partition rule {rule!r}: the spec must be a sequence with one entry per dimension.")
        for entry in spec:
            axes = _spec_axes(entry)
            unknown = [a for a in axes if a not in MESH_AXES]
            if unknown or not all(isinstance(a, str) for a in axes):
                raise ValueError(
                    f"partition rule {rule!r} names unknown mesh axes {unknown or list(axes)}; "
                    f"the axes are {list(MESH_AXES)} (or None)."
                )


def partition_rules(extra: Sequence = ()) -> tuple:
    """The rules of ``config.partition_rules`` (checked by :func:`check_rules`), then :data:`TENSOR_PARALLEL_RULES`."""
    extra = tuple(extra or ())
    check_rules(extra)
    return (*((pattern, tuple(spec)) for pattern, spec in extra), *TENSOR_PARALLEL_RULES)


def _path_name(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def partition_spec(name: str, shape: Sequence[int], dtype, sizes: Mapping[str, int], rules=TENSOR_PARALLEL_RULES) -> P:
    """How the array ``name`` of ``shape`` is split: the first matching rule, then FSDP.

    Arrays that are not floating point (step, RNG, counters) and scalars are replicated. A
    matching rule gives the axes of each dimension; it must have one entry per dimension
    and its axes must divide them (axes of size 1 are dropped, so the default mesh
    replicates everything). Then, if ``sizes["fsdp"] > 1``, the largest dimension
    (the first of equal ones) that no rule split and that ``fsdp`` divides is split along
    ``fsdp``, unless the rule uses ``fsdp`` itself; an array with no such dimension stays
    replicated over ``fsdp``.
    """
    spec = [None] * len(shape)
    if not jnp.issubdtype(dtype, jnp.floating) or not shape:
        return P()
    for pattern, rule in rules:
        if re.search(pattern, name):
            if len(rule) != len(shape):
                raise ValueError(
                    f"partition rule ({pattern!r}, {rule}) has {len(rule)} entries but {name} has shape {tuple(shape)}."
                )
            for dim, entry in enumerate(rule):
                size = math.prod(sizes[a] for a in _spec_axes(entry))
                if shape[dim] % size:
                    raise ValueError(
                        f"partition rule ({pattern!r}, {rule}) splits dimension {dim} of {name} "
                        f"(shape {tuple(shape)}) over {size} devices, which does not divide it."
                    )
            spec = [_drop_unit_axes(entry, sizes) for entry in rule]
            break
    fsdp = sizes.get(FSDP_AXIS, 1)
    if fsdp > 1 and not any(FSDP_AXIS in _spec_axes(entry) for entry in spec):
        free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % fsdp == 0]
        if free:
            spec[max(free, key=lambda d: (shape[d], -d))] = FSDP_AXIS
    return P(*spec)


def state_shardings(tree, mesh: Mesh, rules=TENSOR_PARALLEL_RULES):
    """A ``NamedSharding`` for every array of ``tree`` (arrays or ``jax.ShapeDtypeStruct``), by :func:`partition_spec`.

    The rules see each array's path with dict keys and attribute names joined by ``/``, so
    ``params/...``, ``ema_params/...`` and the optimizer moments (``opt_state/.../mu/...``)
    of the same parameter are split alike.
    """
    sizes = dict(mesh.shape)

    def one(path, x):
        return NamedSharding(mesh, partition_spec(_path_name(path), x.shape, x.dtype, sizes, rules))

    return jax.tree_util.tree_map_with_path(one, tree)


def bytes_per_device(tree) -> int:
    """Bytes of ``tree`` held by the device holding the most: shard shapes of each array's sharding.

    Works on placed arrays and on ``jax.ShapeDtypeStruct`` with a sharding (nothing allocated).
    """
    total: dict = {}
    for x in jax.tree.leaves(tree):
        itemsize = np.dtype(x.dtype).itemsize
        for device, index in x.sharding.devices_indices_map(tuple(x.shape)).items():
            shard = [len(range(*s.indices(n))) for s, n in zip(index, x.shape, strict=True)]
            total[device] = total.get(device, 0) + math.prod(shard) * itemsize
    return max(total.values(), default=0)
