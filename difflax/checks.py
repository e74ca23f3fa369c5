"""Argument checks shared by the core.

Each check raises a ``ValueError`` (a bad value) or ``TypeError`` (a bad type) whose
message names the argument, what was given and what is allowed. Checks on array
values look only at concrete values: a traced value is not checked, so a check runs
once at trace time and costs nothing inside ``jit``. Every function here is pure.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "as_shape",
    "check_batched",
    "check_choice",
    "check_floating",
    "check_in_range",
    "check_nonnegative_int",
    "check_positive_int",
    "concrete",
    "concrete_float",
]


def check_floating(x, name: str) -> None:
    """Raise a ``TypeError`` naming ``name`` unless ``x`` is a floating-point array."""
    dtype = getattr(x, "dtype", None)
    dtype = np.asarray(x).dtype if dtype is None else dtype
    if not jax.numpy.issubdtype(dtype, jax.numpy.floating):
        raise TypeError(f"{name} must be a floating-point array; got {dtype}. Convert it, e.g. x.astype(jnp.float32).")


def concrete(x) -> np.ndarray | None:
    """``x`` as a NumPy array, or ``None`` if it is traced (its value is unknown at trace time)."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def concrete_float(x) -> float | None:
    """``float(x)`` for a concrete scalar, ``None`` for a traced one (or one that is not a scalar)."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def check_choice(value, allowed: Sequence, name: str):
    """``value`` if it is one of ``allowed`` (names or integers); else a ``ValueError`` listing them."""
    if isinstance(value, bool) or not isinstance(value, str | int | np.integer) or value not in allowed:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {', '.join(map(repr, allowed))}.")
    return value


def check_positive_int(value, name: str) -> int:
    """``value`` as an ``int`` if it is a positive Python or NumPy integer (not a bool)."""
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}.")
    return int(value)


def check_nonnegative_int(value, name: str) -> int:
    """``value`` as an ``int`` if it is a non-negative Python or NumPy integer (not a bool)."""
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int; got {value!r}.")
    return int(value)


def check_batched(x, name: str) -> None:
    """Raise a ``ValueError`` if ``x`` has no leading batch axis (is a scalar)."""
    if jnp.ndim(x) < 1:
        raise ValueError(f"{name} must have a leading batch axis; got a scalar.")


def as_shape(shape, name: str = "shape") -> tuple[int, ...]:
    """An int or a sequence of ints as a shape tuple."""
    if isinstance(shape, int):
        return (shape,)
    try:
        return tuple(int(s) for s in shape)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be an int or a tuple of ints; got {shape!r}.") from err


def check_in_range(x, lo, hi, name: str, *, context: str = "", tol: float = 0.0) -> None:
    """Raise a ``ValueError`` if a concrete ``x`` has a value outside ``[lo - tol, hi + tol]``.

    A traced ``x``, traced bounds and an empty ``x`` are not checked; NaNs are ignored.
    ``context`` ends the message's first clause (e.g. ``" for the Flow process"``).
    """
    value, lo, hi = concrete(x), concrete_float(lo), concrete_float(hi)
    if value is None or lo is None or hi is None or not value.size:
        return
    value = value.astype(np.float64)
    low, high = np.nanmin(value), np.nanmax(value)
    if low < lo - tol or high > hi + tol:
        got = f"{low:g}" if value.size == 1 else f"values in [{low:g}, {high:g}]"
        raise ValueError(f"{name} must lie in [{lo:g}, {hi:g}]{context}; got {got}.")
