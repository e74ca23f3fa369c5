"""Pairwise distances in row chunks, so that ``N x M`` matrices never have to fit in memory.

Two forms, chosen by the caller:

* :func:`sq_distances_gram` uses ``|x|^2 + |y|^2 - 2 x.y`` (one matmul; right for
  high-dimensional features such as Inception's 2048-d; the dot runs at ``HIGHEST``
  precision so GPUs do not drop to TF32), clipped at 0;
* :func:`sq_distances_direct` sums ``(x - y)^2`` over coordinates (no cancellation, exact
  zeros on the diagonal; right for low-dimensional samples where ``sqrt`` of a round-off
  residue would bias an energy distance).

:func:`map_row_chunks` applies a function to fixed-size row chunks with ``lax.map`` (one
compiled body, padding rows dropped), so everything here jits.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["kth_nearest_distance", "map_row_chunks", "sq_distances_direct", "sq_distances_gram"]


def _float(x):
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def sq_distances_gram(x, y):
    """``(N, M)`` squared Euclidean distances via the Gram matrix, clipped at 0."""
    x, y = _float(x), _float(y)
    xy = jnp.matmul(x, y.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(jnp.sum(x * x, -1)[:, None] + jnp.sum(y * y, -1)[None, :] - 2 * xy, 0.0)


def sq_distances_direct(x, y):
    """``(N, M)`` squared Euclidean distances by summing squared coordinate differences."""
    x, y = _float(x), _float(y)
    return jnp.sum((x[:, None, :] - y[None, :, :]) ** 2, axis=-1)


def map_row_chunks(fn: Callable, x, chunk_size: int):
    """``fn`` applied to ``chunk_size``-row blocks of ``x`` and concatenated: ``fn(x)`` without the memory.

    ``x`` is an array or a pytree of arrays with a common leading dimension; ``fn`` must
    map such ``(chunk, ...)`` blocks to outputs with leading dimension ``chunk`` (row-wise).
    The last block is zero-padded and its padding rows are dropped.
    """
    leaves = jax.tree.leaves(x)
    n = leaves[0].shape[0]
    chunk = max(1, min(int(chunk_size), n))
    num = -(-n // chunk)
    pad = num * chunk - n

    def blocks(a):
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape((num, chunk, *a.shape[1:]))

    out = jax.lax.map(fn, jax.tree.map(blocks, x))
    return jax.tree.map(lambda o: o.reshape((num * chunk, *o.shape[2:]))[:n], out)


def kth_nearest_distance(x, k: int, chunk_size: int = 1024):
    """Distance from each row of ``x`` to its ``k``-th nearest *other* row (Gram form).

    The row itself (distance 0) is the 0-th neighbour, so this is the ``(k+1)``-th smallest
    entry of each row of the distance matrix, as in Kynkäänniemi et al. and Naeem et al.
    """
    x = _float(x)
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"k must be in [1, {x.shape[0] - 1}] for {x.shape[0]} points; got {k}.")

    def rows(block):
        neg, _ = jax.lax.top_k(-sq_distances_gram(block, x), k + 1)
        return jnp.sqrt(-neg[:, k])

    return map_row_chunks(rows, x, chunk_size)
