"""Linear interpolation in the tables of discrete noise schedules, without ``jnp.interp``'s loop.

``jnp.interp`` finds each point's segment with a binary search that compiles to a ``while``
loop over every element; a sampler calls it on every step. :func:`interp_uniform` finds the
segment of uniform knots directly and :func:`interp_sorted` unrolls the search; both apply
``jnp.interp``'s own formula, so the values are the same.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["interp_sorted", "interp_uniform"]


def interp_uniform(t, knots, table):
    """``jnp.interp(t, knots, table)`` on the uniform knots ``knots[n] = n / N``, ``n = 0 .. N``, in constant time.

    The segment ``i`` with ``knots[i] <= t < knots[i+1]`` is ``floor(N t)`` (clipped to
    ``0 .. N - 1``), moved by one where rounding puts ``N t`` on the other side of a knot, and
    ``f(t) = table[i] + (t - knots[i]) / (knots[i+1] - knots[i]) (table[i+1] - table[i])``, with
    ``table[0]`` / ``table[N]`` beyond ``[0, 1]``: the formula of ``jnp.interp``, so the same
    values, without its binary search, which compiles to a loop over every element.
    """
    n = table.shape[0] - 1
    i = jnp.clip(jnp.floor(t * n).astype(jnp.int32), 0, n - 1)
    i = jnp.clip(i + (t >= knots[i + 1]) - (t < knots[i]), 0, n - 1)
    lo = knots[i]
    f = table[i] + ((t - lo) / (knots[i + 1] - lo)) * (table[i + 1] - table[i])
    return jnp.where(t < knots[0], table[0], jnp.where(t > knots[n], table[n], f))


def interp_sorted(x, xp, fp):
    """``jnp.interp(x, xp, fp)`` for increasing knots ``xp``, with an unrolled binary search.

    ``f(x) = fp[i-1] + (x - xp[i-1]) / (xp[i] - xp[i-1]) (fp[i] - fp[i-1])`` with ``i`` the
    insertion index of ``x`` (clipped to ``1 .. len(xp) - 1``), and ``fp[0]`` / ``fp[-1]`` outside
    ``[xp[0], xp[-1]]`` (``fp[i-1]`` on a segment of zero width, as ``jnp.interp``):
    ``ceil(log2(len(xp)))`` gathers per element instead of a loop.
    """
    # One query (a sampler's time) compares against every knot in one vectorised pass; many
    # queries (a batch of training times) search, ceil(log2(len(xp))) gathers each.
    method = "compare_all" if jnp.size(x) == 1 else "scan_unrolled"
    i = jnp.clip(jnp.searchsorted(xp, x, side="right", method=method), 1, xp.shape[0] - 1)
    lo, dx = xp[i - 1], xp[i] - xp[i - 1]
    wide = dx > 0
    f = fp[i - 1] + jnp.where(wide, (x - lo) / jnp.where(wide, dx, 1), 0) * (fp[i] - fp[i - 1])
    return jnp.where(x < xp[0], fp[0], jnp.where(x > xp[-1], fp[-1], f))
