"""Streaming feature statistics: count, mean and covariance, mergeable across batches and devices.

A :class:`FeatureStats` holds ``n`` (the number of rows), the mean ``m`` and the centered
scatter matrix ``M2 = sum_i (x_i - m)(x_i - m)^T``; the covariance is ``M2 / (n - ddof)``
(``ddof = 1``, numpy's ``np.cov`` default and what FID code uses). Two sets of statistics
combine exactly with Chan, Golub & LeVeque's parallel update (1979, "Updating formulae
and a pairwise algorithm for computing sample variances"):

    n = n_a + n_b,   delta = m_b - m_a,
    m = m_a + delta n_b / n,
    M2 = M2_a + M2_b + delta delta^T n_a n_b / n.

Unlike the raw sums ``sum x`` and ``sum x x^T``, which lose every digit of a small
covariance under a large mean in float32, these updates only ever add centered terms.
The recommended split (what :mod:`difflax.metrics.evaluate` does) is:

* on device, per batch: :func:`batch_stats` (float32 is fine: one batch's mean and
  centered scatter are accurate), across a mesh axis with :func:`psum_stats` inside
  ``shard_map``/``pmap``;
* on host, across batches: :func:`merge` on float64 numpy copies (:func:`to_host`).

:func:`merge`, :func:`update` and :func:`merge_stacked` use only arithmetic operators,
so the same code runs on numpy arrays (host) and on jax arrays (inside ``jit``).
An empty :func:`init` acts as the identity of :func:`merge`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

__all__ = [
    "FeatureStats",
    "batch_stats",
    "init",
    "load_stats",
    "merge",
    "merge_stacked",
    "psum_stats",
    "save_stats",
    "stats_from_moments",
    "to_host",
    "update",
]


@struct.dataclass
class FeatureStats:
    """Count, mean and centered scatter ``M2`` of a set of ``D``-dimensional feature rows.

    A pytree (it jits, shards and ``device_get``\\ s); ``count`` is a float array so that a
    masked batch can carry a traced count.
    """

    count: jax.Array | np.ndarray
    mean: jax.Array | np.ndarray
    m2: jax.Array | np.ndarray

    @property
    def dim(self) -> int:
        return self.mean.shape[-1]

    def covariance(self, ddof: int = 1):
        """``M2 / (count - ddof)``: unbiased (``ddof=1``, as ``np.cov``) or maximum-likelihood (``0``)."""
        return self.m2 / (self.count - ddof)

    def mu_sigma(self, ddof: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """``(mu, sigma)`` as float64 numpy, the pair FID code saves and consumes."""
        host = to_host(self)
        return host.mean, host.covariance(ddof)


def init(dim: int, dtype=np.float64) -> FeatureStats:
    """Empty statistics (``count = 0``), the identity element of :func:`merge`; numpy arrays."""
    return FeatureStats(count=np.zeros((), dtype), mean=np.zeros((dim,), dtype), m2=np.zeros((dim, dim), dtype))


def _outer(a, b):
    return a[..., :, None] * b[..., None, :]


def merge(a: FeatureStats, b: FeatureStats) -> FeatureStats:
    """Statistics of the union of the two row sets (Chan et al. parallel combination).

    Exact in exact arithmetic, associative and commutative; empty inputs are fine.
    Works on numpy (host, keep it float64) and on jax arrays (inside ``jit``).
    """
    n = a.count + b.count
    n_safe = n + (n == 0)  # avoids 0 / 0 when both are empty, without np/jnp-specific calls
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / n_safe)[..., None]
    m2 = a.m2 + b.m2 + _outer(delta, delta) * (a.count * b.count / n_safe)[..., None, None]
    return FeatureStats(count=n, mean=mean, m2=m2)


@jax.jit
def batch_stats(features, mask=None) -> FeatureStats:
    """Statistics of one ``(B, D)`` batch, optionally counting only rows where ``mask`` is true.

    Jitted (and traceable inside ``jit``/``shard_map``); computed in the features'
    floating dtype (at least float32) with a two-pass centered scatter, so it is accurate
    even when ``|mean| >> std``.
    """
    x = jnp.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"features must have shape (batch, dim); got {x.shape}.")
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    w = jnp.ones(x.shape[:1], x.dtype) if mask is None else jnp.asarray(mask).astype(x.dtype)
    if w.shape != x.shape[:1]:
        raise ValueError(f"mask must have shape ({x.shape[0]},); got {w.shape}.")
    count = jnp.sum(w)
    mean = (w @ x) / jnp.maximum(count, 1)
    xc = (x - mean) * w[:, None]
    return FeatureStats(count=count, mean=mean, m2=xc.T @ xc)


def _batch_stats_numpy(x, dtype):
    x = np.asarray(x, dtype)
    if x.ndim != 2:
        raise ValueError(f"features must have shape (batch, dim); got {x.shape}.")
    mean = x.mean(axis=0)
    xc = x - mean
    return FeatureStats(count=np.asarray(x.shape[0], dtype), mean=mean, m2=xc.T @ xc)


def update(stats: FeatureStats, features, mask=None) -> FeatureStats:
    """``merge(stats, batch_stats(features, mask))``: fold one batch in (pure).

    A numpy accumulator (from :func:`init`) stays numpy in its dtype: numpy features are
    reduced on the host in that dtype, jax features on device first (jitted).
    """
    if isinstance(stats.mean, np.ndarray):
        if isinstance(features, np.ndarray) and mask is None:
            return merge(stats, _batch_stats_numpy(features, stats.mean.dtype))
        return merge(stats, to_host(batch_stats(features, mask), dtype=stats.mean.dtype))
    return merge(stats, batch_stats(features, mask))


def psum_stats(stats: FeatureStats, axis_name) -> FeatureStats:
    """Exact merge of per-device statistics over a mapped axis (``shard_map``/``pmap``).

    Two all-reduces, both of centered quantities:
    ``n = psum(n_i)``, ``m = psum(n_i m_i) / n``, ``M2 = psum(M2_i + n_i (m_i - m)(m_i - m)^T)``.
    """
    n = jax.lax.psum(stats.count, axis_name)
    mean = jax.lax.psum(stats.count * stats.mean, axis_name) / jnp.maximum(n, 1)
    d = stats.mean - mean
    m2 = jax.lax.psum(stats.m2 + stats.count * _outer(d, d), axis_name)
    return FeatureStats(count=n, mean=mean, m2=m2)


def merge_stacked(stats: FeatureStats) -> FeatureStats:
    """Merge statistics stacked along a leading axis (e.g. per-device partials after ``device_get``)."""
    out = FeatureStats(count=stats.count[0], mean=stats.mean[0], m2=stats.m2[0])
    for i in range(1, stats.count.shape[0]):
        out = merge(out, FeatureStats(count=stats.count[i], mean=stats.mean[i], m2=stats.m2[i]))
    return out


def to_host(stats: FeatureStats, dtype=np.float64) -> FeatureStats:
    """A numpy copy (``jax.device_get``) in ``dtype`` (float64 by default), for host-side merging."""
    host = jax.device_get(stats)
    return FeatureStats(
        count=np.asarray(host.count, dtype), mean=np.asarray(host.mean, dtype), m2=np.asarray(host.m2, dtype)
    )


def stats_from_moments(mu, sigma, count, ddof: int = 1) -> FeatureStats:
    """Rebuild :class:`FeatureStats` from a mean, covariance (with ``ddof``) and count."""
    mu = np.asarray(mu, np.float64)
    sigma = np.asarray(sigma, np.float64)
    count = np.asarray(count, np.float64)
    return FeatureStats(count=count, mean=mu, m2=sigma * (count - ddof))


def save_stats(path, stats: FeatureStats, **extra) -> None:
    """Save as ``.npz`` with keys ``mu``, ``sigma`` (``ddof=1``), ``count`` and any ``extra`` arrays.

    ``mu``/``sigma`` are the names pytorch-fid and TTUR use for precomputed statistics.
    """
    host = to_host(stats)
    np.savez(path, mu=host.mean, sigma=host.covariance(1), count=host.count, **extra)


def load_stats(path) -> FeatureStats:
    """Load statistics saved by :func:`save_stats`, or any ``.npz`` with ``mu`` and ``sigma``.

    Files without ``count`` (e.g. pytorch-fid reference statistics) get the placeholder
    ``count = 2``, so that :meth:`FeatureStats.covariance` returns ``sigma`` unchanged;
    such statistics can be compared but must not be merged.
    """
    with np.load(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path} must contain arrays 'mu' and 'sigma'; found {sorted(f.files)}.")
        count = f["count"] if "count" in f else 2.0
        return stats_from_moments(f["mu"], f["sigma"], count)
