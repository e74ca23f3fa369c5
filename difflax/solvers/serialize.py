"""Solver configs, learned samplers included, as flat dicts of NumPy arrays (``np.savez`` / ``np.load``).

>>> np.savez("ld3.npz", **to_arrays(sampler))
>>> sampler = from_arrays(np.load("ld3.npz"))

Each config (a :func:`difflax.pytree.dataclass`) is stored under its path (``""`` for the top one,
``"inner."`` for a wrapped solver): ``<path>__class__`` names its class, ``<path><field>`` holds each
field, arrays and static values alike (strings, numbers, booleans). Only the classes of
:data:`SERIALIZABLE` are rebuilt, so a file names no code to import; writing and reading the
file is left to the caller (the core does no I/O).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from difflax.solvers.base import Solver
from difflax.solvers.epd import EPD
from difflax.solvers.learned import LearnedGrid
from difflax.solvers.registry import SOLVERS

__all__ = ["SERIALIZABLE", "from_arrays", "to_arrays"]

SERIALIZABLE: dict[str, type] = {cls.__name__: cls for cls in (*SOLVERS.values(), LearnedGrid, EPD)}

_CLASS = "__class__"


def to_arrays(sampler: Solver, prefix: str = "") -> dict[str, np.ndarray]:
    """``sampler`` (a class of :data:`SERIALIZABLE`) as a flat dict of arrays, its keys prefixed by ``prefix``."""
    name = type(sampler).__name__
    if SERIALIZABLE.get(name) is not type(sampler):
        raise TypeError(f"sampler must be one of {', '.join(sorted(SERIALIZABLE))}; got {name}.")
    out = {prefix + _CLASS: np.asarray(name)}
    for f in dataclasses.fields(sampler):
        value = getattr(sampler, f.name)
        if isinstance(value, Solver):
            out.update(to_arrays(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = np.asarray(value)
    return out


def from_arrays(arrays: Mapping, prefix: str = "") -> Solver:
    """The sampler stored by :func:`to_arrays` (e.g. the ``NpzFile`` of ``np.load``)."""
    key = prefix + _CLASS
    if key not in arrays:
        raise ValueError(f"arrays hold no sampler: no {key!r} entry (write them with difflax.solvers.to_arrays).")
    name = str(arrays[key])
    if name not in SERIALIZABLE:
        raise ValueError(f"arrays name the class {name!r}; expected one of {', '.join(sorted(SERIALIZABLE))}.")
    cls, kwargs = SERIALIZABLE[name], {}
    for f in dataclasses.fields(cls):
        if prefix + f.name + "." + _CLASS in arrays:
            kwargs[f.name] = from_arrays(arrays, f"{prefix}{f.name}.")
        elif prefix + f.name in arrays:
            value = np.asarray(arrays[prefix + f.name])
            kwargs[f.name] = value.item() if f.metadata.get("static", False) else jnp.asarray(value)
    return cls(**kwargs)
