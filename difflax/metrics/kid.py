"""Kernel Inception Distance: unbiased MMD^2 with a cubic polynomial kernel.

Binkowski, Sutherland, Arbel & Gretton (2018), "Demystifying MMD GANs": with
``k(x, y) = (x.y / d + 1)^3`` on ``d``-dimensional features, KID is the unbiased
estimator (Gretton et al. 2012) of the squared maximum mean discrepancy

    MMD^2_u = 1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(m(m-1)) sum_{i != j} k(y_i, y_j)
              - 2/m^2 sum_{i, j} k(x_i, y_j),

averaged over ``n_subsets`` random subsets of ``subset_size`` rows drawn without
replacement from each set (defaults 100 and 1000, as in the reference implementation
and torch-fidelity); the spread over subsets is reported as the standard deviation. The
estimator is unbiased, so it can be slightly negative for identical distributions.

Kernels are computed in the features' dtype (at least float32; float64 under
``jax.enable_x64``) with ``HIGHEST`` matmul precision; subsets run one at a time under
``lax.map`` with a fixed key, so results are reproducible.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["kid", "mmd2_unbiased", "polynomial_kernel"]


def polynomial_kernel(x, y, degree: int = 3, gamma: float | None = None, coef0: float = 1.0):
    """``(gamma x.y + coef0)^degree``, ``gamma = 1 / d`` by default."""
    gamma = 1.0 / x.shape[-1] if gamma is None else gamma
    return (gamma * jnp.matmul(x, y.T, precision=jax.lax.Precision.HIGHEST) + coef0) ** degree


def mmd2_unbiased(kxx, kyy, kxy):
    """Unbiased ``MMD^2`` from the three kernel matrices (diagonals of ``kxx``, ``kyy`` excluded)."""
    m = kxx.shape[0]
    n = kyy.shape[0]
    sxx = (jnp.sum(kxx) - jnp.trace(kxx)) / (m * (m - 1))
    syy = (jnp.sum(kyy) - jnp.trace(kyy)) / (n * (n - 1))
    return sxx + syy - 2 * jnp.mean(kxy)


def kid(real_features, fake_features, n_subsets: int = 100, subset_size: int = 1000, key=None):
    """KID ``(mean, std)`` over ``n_subsets`` subsets of ``subset_size`` rows.

    Args:
      real_features, fake_features: ``(N, d)`` and ``(M, d)`` features (e.g. Inception pool3).
      n_subsets: number of random subsets.
      subset_size: rows per subset, drawn without replacement from each set; must be at
        most ``min(N, M)`` (pass ``subset_size=min(N, M)`` for small sets).
      key: PRNG key for the subsets (default ``jax.random.key(0)``).

    Returns:
      ``(mean, std)`` of the per-subset ``MMD^2_u`` as Python floats (KID is often
      reported multiplied by 1000).
    """
    x = jnp.asarray(real_features)
    y = jnp.asarray(fake_features)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"features must be (N, d) and (M, d) with equal d; got {x.shape} and {y.shape}.")
    if not 2 <= subset_size <= min(x.shape[0], y.shape[0]):
        raise ValueError(f"subset_size must be in [2, min(N, M) = {min(x.shape[0], y.shape[0])}]; got {subset_size}.")
    key = jax.random.key(0) if key is None else key
    values = _kid_subsets(x, y, jax.random.split(key, n_subsets), subset_size)
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std())


@functools.partial(jax.jit, static_argnums=3)
def _kid_subsets(x, y, keys, subset_size):
    dtype = jnp.promote_types(jnp.result_type(x, y), jnp.float32)
    x, y = x.astype(dtype), y.astype(dtype)

    def one(k):
        kx, ky = jax.random.split(k)
        xs = x[jax.random.choice(kx, x.shape[0], (subset_size,), replace=False)]
        ys = y[jax.random.choice(ky, y.shape[0], (subset_size,), replace=False)]
        return mmd2_unbiased(polynomial_kernel(xs, xs), polynomial_kernel(ys, ys), polynomial_kernel(xs, ys))

    return jax.lax.map(one, keys)
