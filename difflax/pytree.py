"""Immutable pytree dataclasses: how the core declares its configs (processes, solvers, mixtures).

>>> @pytree.dataclass
... class DDIM(Solver):
...     eta: float = 0.0                                # a leaf: traced, sweeping it never recompiles
...     variant: str = pytree.field(static=True, default="a")   # static: part of the program

A frozen :func:`dataclasses.dataclass` registered with :mod:`jax.tree_util`: array-valued
fields are leaves, fields declared with ``field(static=True)`` are auxiliary data that
must be hashable. Rebuilding from leaves (``jax.tree.map``, ``jit`` outputs) bypasses
``__init__``, so ``__post_init__`` validation runs only when a user builds the object,
never on tracers or the placeholder leaves that JAX's tree utilities pass.
``obj.replace(**changes)`` is :func:`dataclasses.replace`.
The core uses this instead of ``flax.struct`` so that it imports no Flax.
"""

from __future__ import annotations

import dataclasses

import jax

__all__ = ["dataclass", "field"]


def field(*, static: bool = False, **kwargs):
    """A dataclass field; ``static=True`` makes it auxiliary data (hashable, not traced)."""
    metadata = dict(kwargs.pop("metadata", None) or {}, static=static)
    return dataclasses.field(metadata=metadata, **kwargs)


def _replace(self, **changes):
    """A copy with ``changes`` applied (validated by ``__post_init__`` like a new object)."""
    return dataclasses.replace(self, **changes)


def _check_leaves_first(cls) -> None:
    """Make ``__post_init__`` reject a string given for a leaf (e.g. ``DDIM(eta="a")``) by name."""
    post_init = getattr(cls, "__post_init__", None)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.init and not f.metadata.get("static", False) and isinstance(value, str | bytes):
                raise TypeError(f"{type(self).__name__}: {f.name} must be a number or an array; got {value!r}.")
        if post_init is not None:
            post_init(self)

    cls.__post_init__ = __post_init__


def dataclass(cls=None, /, **kwargs):
    """Declare ``cls`` a frozen dataclass and a pytree (see the module docstring)."""

    def wrap(cls):
        _check_leaves_first(cls)
        cls = dataclasses.dataclass(frozen=True, **kwargs)(cls)
        fields = [f for f in dataclasses.fields(cls) if f.init]
        static = tuple(f.name for f in fields if f.metadata.get("static", False))
        leaves = tuple(f.name for f in fields if not f.metadata.get("static", False))

        def flatten_with_keys(obj):
            children = [(jax.tree_util.GetAttrKey(n), getattr(obj, n)) for n in leaves]
            return children, tuple(getattr(obj, n) for n in static)

        def flatten(obj):
            return [getattr(obj, n) for n in leaves], tuple(getattr(obj, n) for n in static)

        def unflatten(aux, children):
            obj = object.__new__(cls)
            for name, value in zip(static, aux, strict=True):
                object.__setattr__(obj, name, value)
            for name, value in zip(leaves, children, strict=True):
                object.__setattr__(obj, name, value)
            return obj

        jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
        cls.replace = _replace
        return cls

    return wrap if cls is None else wrap(cls)
