"""Flax parameter trees <-> PyTorch tensor names, for modules named after the checkpoint's modules.

A parameter's path joined by ``"."`` is the tensor's name with the leaf renamed
(``kernel``, ``scale``, ``embedding`` -> ``weight``; ``bias`` stays), as in
:class:`~difflax.models.UNet2D` and :class:`~difflax.models.DiTTransformer2D`. Values differ
only in axis order: a ``Dense`` kernel ``(in, out)`` is the transposed ``Linear`` weight
``(out, in)``; a ``Conv`` kernel ``(kh, kw, in, out)`` is the ``Conv2d`` weight
``(out, in, kh, kw)`` permuted; norm scales / biases and embedding tables are equal. Both
directions are exact (no arithmetic), so export after import gives the checkpoint back bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from difflax.hub.common import ConversionError, TensorSource

__all__ = ["check_tree", "export_params", "import_params", "tensor_name"]

_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_TO_TORCH = {2: (1, 0), 4: (3, 2, 0, 1)}  # kernel ndim -> permutation of the Flax axes
_FROM_TORCH = {2: (1, 0), 4: (2, 3, 1, 0)}


def tensor_name(path: tuple[str, ...]) -> str:
    """The checkpoint name of the Flax parameter at ``path`` (e.g. ``("conv_in", "kernel")`` -> ``conv_in.weight``)."""
    if path[-1] not in _LEAVES:
        raise ConversionError(f"parameter {'/'.join(path)} has no checkpoint counterpart (leaf {path[-1]!r}).")
    return ".".join((*path[:-1], _LEAVES[path[-1]]))


def _axes(path: tuple[str, ...], ndim: int, table: dict) -> tuple[int, ...] | None:
    """The axis permutation of a kernel between the two layouts (``None``: same layout)."""
    return table[ndim] if path[-1] == "kernel" else None


def import_params(shapes, source: TensorSource) -> dict:
    """The Flax parameters of the tree of shapes ``shapes`` (e.g. from ``jax.eval_shape``), read from ``source``.

    Each tensor is taken by name with its expected shape checked (a missing tensor or a shape
    mismatch raises :class:`ConversionError` naming it); call ``source.finish()`` afterwards to
    refuse tensors the model does not use.
    """
    flat = {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        perm = _axes(path, len(leaf.shape), _TO_TORCH)
        torch_shape = tuple(leaf.shape) if perm is None else tuple(leaf.shape[i] for i in perm)
        tensor = source.take(tensor_name(path), torch_shape)
        perm = _axes(path, len(leaf.shape), _FROM_TORCH)
        flat[path] = jnp.asarray(tensor if perm is None else np.transpose(tensor, perm), leaf.dtype)
    return traverse_util.unflatten_dict(flat)


def export_params(params) -> dict[str, np.ndarray]:
    """Every parameter as a contiguous float32 NumPy tensor under its checkpoint name (the inverse of import)."""
    tensors = {}
    for path, value in traverse_util.flatten_dict(jax.device_get(params)).items():
        value = np.asarray(value, np.float32)
        perm = _axes(path, value.ndim, _TO_TORCH)
        tensors[tensor_name(path)] = np.ascontiguousarray(value if perm is None else np.transpose(value, perm))
    return tensors


def check_tree(expected, params) -> None:
    """Refuse ``params`` whose names or shapes differ from the tree of shapes ``expected``, naming the parameter."""
    want, got = traverse_util.flatten_dict(expected), traverse_util.flatten_dict(params)
    for path in sorted(want.keys() | got.keys()):
        name = "/".join(path)
        if path not in got:
            raise ConversionError(f"parameter {name} of the model is missing from params.")
        if path not in want:
            raise ConversionError(f"parameter {name} of params is not a parameter of the model.")
        if tuple(want[path].shape) != tuple(np.shape(got[path])):
            raise ConversionError(f"parameter {name} has shape {tuple(np.shape(got[path]))}; "
                                  f"the model expects {tuple(want[path].shape)}.")
