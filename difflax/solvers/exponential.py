"""Shared pieces of the exponential integrators (DPM-Solver, DPM-Solver++, UniPC, DEIS).

In ``lambda = log(alpha / sigma)`` the probability-flow ODE has the exact "variation of
constants" solutions (Lu et al. 2022, eq. 3.4; Lu et al. 2022b, eq. 8) whose integrals of
polynomials in ``lambda`` are the ``phi`` functions

    ``phi_1(z) = (e^z - 1) / z``,  ``phi_{k+1}(z) = (phi_k(z) - 1/k!) / z``,  ``phi_k(0) = 1/k!``

(Hochbruck & Ostermann 2010, "Exponential integrators", sec. 2.1). Multistep methods keep
their last model outputs in a typed :class:`History`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from difflax.transitions import Coefficients, coefficients

Array = jax.Array

__all__ = [
    "History",
    "finite_or_zero",
    "intermediate",
    "phi",
    "promote_time",
    "select_by_order",
    "step_size",
    "zphi",
]

# Below this |z| the phi functions use their Taylor series (the recursion cancels).
_SERIES_BELOW = 0.5
_SERIES_TERMS = 18


def promote_time(t, x):
    """``t`` as an array of at least the floating precision of ``x``."""
    t = jnp.asarray(t)
    return t.astype(jnp.result_type(t.dtype, x.dtype, jnp.float32))


def step_size(s: Coefficients, t: Coefficients):
    """``h = lambda_t - lambda_s``; 0 between points of equal ``lambda`` (also both ``-inf``)."""
    same = s.lam == t.lam
    return jnp.where(same, jnp.zeros_like(t.lam), t.lam - jnp.where(same, jnp.zeros_like(s.lam), s.lam))


def phi(k: int, z):
    """``phi_k(z) = sum_j z^j / (j + k)!`` for scalar ``z`` in ``[-inf, inf)``, stable near 0; ``phi_k(-inf) = 0``."""
    z = jnp.asarray(z)
    small = jnp.abs(z) < _SERIES_BELOW
    zr = jnp.where(small, jnp.ones_like(z), z)
    rec = jnp.expm1(zr) / zr
    for j in range(1, k):
        rec = (rec - 1.0 / math.factorial(j)) / zr
    zs = jnp.where(small, z, jnp.zeros_like(z))
    series = jnp.zeros_like(z)
    for j in reversed(range(_SERIES_TERMS)):
        series = series * zs + 1.0 / math.factorial(j + k)
    return jnp.where(small, series, rec)


def zphi(k: int, z):
    """``z phi_k(z)`` (``= e^z - 1`` for ``k = 1``, ``phi_{k-1}(z) - 1/(k-1)!`` otherwise), stable and
    finite at ``z = -inf``; the ``h phi_k(-h)`` of the data-prediction solvers is ``-zphi(k, -h)``."""
    z = jnp.asarray(z)
    if k == 1:
        return jnp.expm1(z)
    small = jnp.abs(z) < _SERIES_BELOW
    return jnp.where(small, z * phi(k, jnp.where(small, z, 0.0)), phi(k - 1, z) - 1.0 / math.factorial(k - 1))


def finite_or_zero(c):
    """A step coefficient, replaced by 0 where it is not finite (its limit where it multiplies a zero difference)."""
    return jnp.where(jnp.isfinite(c), c, jnp.zeros_like(c))


def intermediate(process, s: Coefficients, t: Coefficients, h, r: float) -> Coefficients:
    """Coefficients at ``lambda_s + r h`` (written ``lambda_t - (1 - r) h``, finite-safe for ``lambda_s = -inf``)."""
    lam = t.lam - (1.0 - r) * h
    finite = jnp.isfinite(lam)
    tu = process.t_from_log_snr(2.0 * jnp.where(finite, lam, t.lam))
    return coefficients(process, jnp.where(finite, tu, s.t).astype(s.t.dtype))


def select_by_order(order_now, values):
    """``values[order_now - 1]`` for a traced order (scalars only, so no NaN leaks into gradients)."""
    out = values[0]
    for k, v in enumerate(values[1:], start=2):
        out = jnp.where(order_now == k, v, out)
    return out


class History(NamedTuple):
    """A multistep method's model outputs at its last nodes, newest first, in a ring buffer.

    A step first pushes its own model output (:meth:`push`), then reads the earlier ones from the
    result: ``value(0)`` is the output just pushed, ``value(1)``, ``value(2)``, ... the earlier
    ones (``node(k)`` likewise). The buffer has a slot more than the earlier outputs a method
    reads, so the push overwrites an entry no longer read, in place (one ``dynamic_update_slice``
    moving ``head``); as every read of the history comes after that write, a ``lax.scan`` carrying
    the history can update it in place, without copying the buffer or ``x``.

    Attributes:
      values: ``(size + 1, *x.shape)`` model outputs (``x0_hat`` or ``eps_hat``).
      nodes: ``(size + 1,)`` where they were taken (``lambda`` or ``rho``).
      count: how many entries are filled (int32).
      head: the slot of the newest entry (int32).
    """

    values: Array
    nodes: Array
    count: Array
    head: Array

    @classmethod
    def empty(cls, size: int, x: Array) -> History:
        """No entries, room for the newest output and ``size`` earlier ones."""
        node_dtype = jnp.result_type(x.dtype, jnp.float32)
        zero = jnp.zeros((), jnp.int32)
        return cls(jnp.zeros((size + 1, *x.shape), x.dtype), jnp.zeros((size + 1,), node_dtype), zero, zero)

    def _slot(self, k: int):
        return (self.head + k) % self.values.shape[0]

    def value(self, k: int) -> Array:
        """The ``k``-th newest model output (``k = 0``: the newest)."""
        return jax.lax.dynamic_index_in_dim(self.values, self._slot(k), keepdims=False)

    def node(self, k: int) -> Array:
        """The node of the ``k``-th newest model output."""
        return jax.lax.dynamic_index_in_dim(self.nodes, self._slot(k), keepdims=False)

    def push(self, value, node) -> History:
        """Make ``(value, node)`` the newest entry, written over the oldest."""
        size = self.values.shape[0]
        head = (self.head - 1) % size
        values = jax.lax.dynamic_update_index_in_dim(self.values, jnp.asarray(value, self.values.dtype), head, 0)
        nodes = jax.lax.dynamic_update_index_in_dim(self.nodes, jnp.asarray(node, self.nodes.dtype), head, 0)
        return History(values, nodes, jnp.minimum(self.count + 1, size), head)

    def order(self, max_order: int):
        """``min(max_order, count)``: the order the filled entries support (after the push)."""
        return jnp.minimum(max_order, self.count)
