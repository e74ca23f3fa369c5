"""Exact denoisers, scores and densities for Gaussian-mixture data.

If ``x0 ~ sum_k w_k N(mu_k, S_k)`` and ``x_t = alpha x0 + sigma eps`` then every
noisy marginal is again a Gaussian mixture,

    p_t(x) = sum_k w_k N(x; alpha mu_k, C_k),   C_k = alpha^2 S_k + sigma^2 I,

with component posteriors ``p(k | x_t) = softmax_k(log w_k + log N(x; alpha mu_k, C_k))``
and per-component posterior means (Gaussian conditioning)

    E[x0 | x_t, k] = mu_k + alpha S_k C_k^{-1} (x_t - alpha mu_k),

so ``E[x0 | x_t] = sum_k p(k | x_t) E[x0 | x_t, k]`` and the score is
``grad log p_t = sum_k p(k | x_t) C_k^{-1} (alpha mu_k - x_t)``. Tweedie's formula
``score = (alpha E[x0 | x_t] - x_t) / sigma^2`` ties the two together.

Covariances are stored by their eigendecomposition ``S_k = U_k diag(lam_k) U_k^T``
(``U_k`` omitted for diagonal or isotropic mixtures), so ``C_k`` shares ``U_k`` and
its inverse and log-determinant cost ``O(D)`` after a rotation. Mixture sums use
log-sum-exp, so narrow, well-separated modes stay finite.

Components may carry class ``labels``; the class-conditional denoiser and score
restrict the mixture to one class, and ``class_posterior`` gives the exact
``p(y | x_t)`` that classifier guidance needs. These exact answers are what the
solver, guidance, likelihood and distillation tests compare against.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from difflax import pytree
from difflax.processes import Process

Array = jax.Array

__all__ = ["GaussianMixture"]


def _as_float(a):
    a = jnp.asarray(a)
    return a if jnp.issubdtype(a.dtype, jnp.floating) else a.astype(jnp.result_type(float))


@pytree.dataclass
class GaussianMixture:
    """A mixture of ``K`` Gaussians in ``D = prod(event_shape)`` dimensions.

    Build with :meth:`isotropic`, :meth:`diagonal` or :meth:`full`.

    Attributes:
      log_weights: ``(K,)`` normalized log mixture weights.
      means: ``(K, D)``.
      eigvals: ``(K, D)`` eigenvalues of each covariance (non-negative).
      eigvecs: ``(K, D, D)`` eigenvectors (columns), or ``None`` for diagonal covariances.
      labels: ``(K,)`` integer class of each component, or ``None``.
      num_classes: number of classes (static).
      event_shape: shape of one data point (static), e.g. ``(8, 8, 1)``.
    """

    log_weights: Array
    means: Array
    eigvals: Array
    eigvecs: Array | None = None
    labels: Array | None = None
    num_classes: int = pytree.field(static=True, default=0)
    event_shape: tuple = pytree.field(static=True, default=())

    # ------------------------------------------------------------------ construction
    @classmethod
    def _build(cls, means, eigvals, eigvecs, weights, labels, event_shape):
        means = _as_float(means)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, D); got {means.shape}.")
        k, d = means.shape
        dtype = means.dtype
        if weights is None:
            log_w = jnp.full((k,), -math.log(k), dtype)
        else:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (k,) or np.any(w < 0) or w.sum() <= 0:
                raise ValueError(f"weights must be {k} non-negative numbers with a positive sum; got {w}.")
            with np.errstate(divide="ignore"):
                log_w = jnp.asarray(np.log(w / w.sum()), dtype)
        if labels is not None:
            labels = jnp.asarray(labels, dtype=jnp.int32)
            if labels.shape != (k,):
                raise ValueError(f"labels must have shape ({k},), one class per component; got {labels.shape}.")
            num_classes = int(np.max(np.asarray(labels))) + 1
        else:
            num_classes = 0
        event_shape = tuple(event_shape) if event_shape is not None else (d,)
        if int(np.prod(event_shape)) != d:
            raise ValueError(f"event_shape {event_shape} does not hold D = {d} values.")
        if np.any(np.asarray(eigvals) < 0):
            raise ValueError("covariances must be positive semi-definite.")
        return cls(
            log_weights=log_w,
            means=means,
            eigvals=jnp.asarray(eigvals, dtype),
            eigvecs=None if eigvecs is None else jnp.asarray(eigvecs, dtype),
            labels=labels,
            num_classes=num_classes,
            event_shape=event_shape,
        )

    @classmethod
    def isotropic(cls, means, stds, weights=None, labels=None, event_shape=None) -> GaussianMixture:
        """Components ``N(mu_k, s_k^2 I)``; ``stds`` is a scalar or ``(K,)``."""
        means = _as_float(means)
        stds = jnp.broadcast_to(jnp.asarray(stds, means.dtype), means.shape[:1])
        return cls._build(means, jnp.broadcast_to(stds[:, None] ** 2, means.shape), None, weights, labels, event_shape)

    @classmethod
    def diagonal(cls, means, variances, weights=None, labels=None, event_shape=None) -> GaussianMixture:
        """Components ``N(mu_k, diag(v_k))``; ``variances`` has shape ``(K, D)``."""
        means = _as_float(means)
        variances = jnp.broadcast_to(jnp.asarray(variances, means.dtype), means.shape)
        return cls._build(means, variances, None, weights, labels, event_shape)

    @classmethod
    def full(cls, means, covs, weights=None, labels=None, event_shape=None) -> GaussianMixture:
        """Components ``N(mu_k, S_k)`` with full ``(K, D, D)`` covariances (symmetric PSD)."""
        covs = np.asarray(covs, dtype=np.float64)
        if covs.ndim != 3 or covs.shape[1] != covs.shape[2]:
            raise ValueError(f"covs must have shape (K, D, D); got {covs.shape}.")
        lam, vecs = np.linalg.eigh(0.5 * (covs + np.swapaxes(covs, 1, 2)))
        if np.any(lam < -1e-10 * np.max(np.abs(lam))):
            raise ValueError("covs must be positive semi-definite.")
        means = _as_float(means)
        return cls._build(means, np.clip(lam, 0.0, None), vecs, weights, labels, event_shape)

    # ------------------------------------------------------------------ basic properties
    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def covariances(self) -> Array:
        """``(K, D, D)`` covariance matrices."""
        if self.eigvecs is None:
            return jax.vmap(jnp.diag)(self.eigvals)
        return jnp.einsum("kij,kj,klj->kil", self.eigvecs, self.eigvals, self.eigvecs)

    def mean(self) -> Array:
        """Mean of the mixture, shape ``(D,)``."""
        return jnp.exp(self.log_weights) @ self.means

    def covariance(self) -> Array:
        """Covariance of the mixture, shape ``(D, D)``."""
        w = jnp.exp(self.log_weights)
        centered = self.means - self.mean()
        return jnp.einsum("k,kij->ij", w, self.covariances()) + jnp.einsum("k,ki,kj->ij", w, centered, centered)

    # ------------------------------------------------------------------ internals
    def _flatten(self, x):
        n_event = len(self.event_shape)
        if tuple(x.shape[x.ndim - n_event :]) != self.event_shape:
            raise ValueError(f"x must end in the event shape {self.event_shape}; got shape {x.shape}.")
        batch_shape = x.shape[: x.ndim - n_event]
        return x.reshape((-1, self.dim)), batch_shape

    def _rotate(self, r, transpose):
        """Apply ``U_k^T`` (``transpose``) or ``U_k`` to ``r`` of shape ``(B, K, D)``."""
        if self.eigvecs is None:
            return r
        spec = "kji,bkj->bki" if transpose else "kij,bkj->bki"
        return jnp.einsum(spec, self.eigvecs, r)

    def _coef(self, c, batch):
        """Per-example coefficient (scalar or ``(B,)``) as shape ``(B or 1, 1, 1)``."""
        c = jnp.asarray(c, self.means.dtype)
        if c.ndim == 0:
            return c.reshape(1, 1, 1)
        if c.shape != (batch,):
            raise ValueError(f"t (or alpha, sigma) must be a scalar or have shape ({batch},); got {c.shape}.")
        return c.reshape(batch, 1, 1)

    def _stats(self, x, alpha, sigma):
        """Rotated residuals, noisy eigenvalues and per-component log densities."""
        a = self._coef(alpha, x.shape[0])
        s = self._coef(sigma, x.shape[0])
        resid = x[:, None, :] - a * self.means[None]  # (B, K, D)
        z = self._rotate(resid, transpose=True)
        var = a**2 * self.eigvals[None] + s**2  # (B or 1, K, D)
        log_n = -0.5 * jnp.sum(z**2 / var + jnp.log(2 * jnp.pi * var), axis=-1)  # (B, K)
        return z, var, a, log_n

    def _log_weights(self, y, batch):
        if y is None:
            return self.log_weights[None]
        if self.labels is None:
            raise ValueError("y was given but this mixture has no component labels.")
        y = jnp.broadcast_to(jnp.asarray(y, jnp.int32), (batch,))
        return jnp.where(self.labels[None] == y[:, None], self.log_weights[None], -jnp.inf)

    def _responsibilities(self, x, alpha, sigma, y=None):
        z, var, a, log_n = self._stats(x, alpha, sigma)
        logits = self._log_weights(y, x.shape[0]) + log_n
        return z, var, a, jax.nn.softmax(logits, axis=-1), logits

    # ------------------------------------------------------------------ exact quantities at given (alpha, sigma)
    def log_prob(self, x, alpha=1.0, sigma=0.0, y=None) -> Array:
        """``log p_t(x)`` (or ``log p_t(x | y)``) for the marginal with coefficients ``alpha, sigma``."""
        xf, batch_shape = self._flatten(jnp.asarray(x))
        _, _, _, log_n = self._stats(xf, alpha, sigma)
        lw = self._log_weights(y, xf.shape[0])
        if y is not None:
            lw = lw - jax.nn.logsumexp(lw, axis=-1, keepdims=True)
        return jax.nn.logsumexp(lw + log_n, axis=-1).reshape(batch_shape)

    def component_posterior(self, x, alpha, sigma, y=None) -> Array:
        """``p(k | x_t)``, shape ``batch + (K,)``."""
        xf, batch_shape = self._flatten(jnp.asarray(x))
        resp = self._responsibilities(xf, alpha, sigma, y)[3]
        return resp.reshape((*batch_shape, self.num_components))

    def class_posterior(self, x, alpha, sigma) -> Array:
        """Exact ``p(y | x_t)`` over the component labels, shape ``batch + (num_classes,)``."""
        if self.labels is None:
            raise ValueError("class_posterior needs a mixture with component labels.")
        resp = self.component_posterior(x, alpha, sigma)
        return resp @ jax.nn.one_hot(self.labels, self.num_classes, dtype=resp.dtype)

    def class_log_posterior(self, x, alpha, sigma) -> Array:
        """``log p(y | x_t)``, computed with log-sum-exp (for classifier guidance)."""
        if self.labels is None:
            raise ValueError("class_log_posterior needs a mixture with component labels.")
        xf, batch_shape = self._flatten(jnp.asarray(x))
        logits = self._responsibilities(xf, alpha, sigma)[4]
        onehot = jax.nn.one_hot(self.labels, self.num_classes, dtype=bool)  # (K, C)
        per_class = jax.nn.logsumexp(jnp.where(onehot[None], logits[:, :, None], -jnp.inf), axis=1)
        out = per_class - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        return out.reshape((*batch_shape, self.num_classes))

    def posterior_mean(self, x, alpha, sigma, y=None) -> Array:
        """``E[x0 | x_t]`` (or ``E[x0 | x_t, y]``): the exact denoiser."""
        x = jnp.asarray(x)
        xf, _ = self._flatten(x)
        z, var, a, resp, _ = self._responsibilities(xf, alpha, sigma, y)
        corr = self._rotate(a * self.eigvals[None] / var * z, transpose=False)  # S C^{-1} (x - a mu)
        out = jnp.einsum("bk,bkd->bd", resp, self.means[None] + corr)
        return out.reshape(x.shape)

    def score(self, x, alpha, sigma, y=None) -> Array:
        """``grad_x log p_t(x)`` (or of ``log p_t(x | y)``)."""
        x = jnp.asarray(x)
        xf, _ = self._flatten(x)
        z, var, _, resp, _ = self._responsibilities(xf, alpha, sigma, y)
        out = jnp.einsum("bk,bkd->bd", resp, self._rotate(-z / var, transpose=False))
        return out.reshape(x.shape)

    # ------------------------------------------------------------------ process-level closures
    def denoiser(self, process: Process, y=None) -> Callable[[Array, Array], Array]:
        """The exact denoiser ``denoise(x_t, t) = E[x0 | x_t]`` under ``process`` (class ``y`` if given)."""

        def denoise(x_t, t):
            return self.posterior_mean(x_t, *process.alpha_sigma(t), y=y)

        return denoise

    def conditional_denoiser(self, process: Process) -> Callable[[Array, Array, Array], Array]:
        """``denoise(x_t, t, y) = E[x0 | x_t, y]`` with the class as a third argument."""

        def denoise(x_t, t, y):
            return self.posterior_mean(x_t, *process.alpha_sigma(t), y=y)

        return denoise

    def score_fn(self, process: Process, y=None) -> Callable[[Array, Array], Array]:
        """``score(x_t, t) = grad log p_t(x_t)`` under ``process``."""

        def score(x_t, t):
            return self.score(x_t, *process.alpha_sigma(t), y=y)

        return score

    def log_prob_fn(self, process: Process, y=None) -> Callable[[Array, Array], Array]:
        """``log_prob(x_t, t) = log p_t(x_t)`` under ``process``."""

        def log_prob(x_t, t):
            return self.log_prob(x_t, *process.alpha_sigma(t), y=y)

        return log_prob

    def noised(self, alpha, sigma) -> GaussianMixture:
        """The marginal at scalar coefficients ``(alpha, sigma)`` as a mixture of its own."""
        return self.replace(means=alpha * self.means, eigvals=alpha**2 * self.eigvals + sigma**2)

    def sample(self, key: Array, num: int, y=None) -> tuple[Array, Array]:
        """``num`` exact draws and their component indices: ``(x of shape (num, *event_shape), k)``.

        With ``y`` (an int or ``(num,)`` labels) draws come from ``p(x | y)``.
        """
        k_key, n_key = jax.random.split(key)
        logits = jnp.broadcast_to(self._log_weights(y, num), (num, self.num_components))
        comp = jax.random.categorical(k_key, logits, axis=-1)
        noise = jax.random.normal(n_key, (num, self.dim), self.means.dtype)
        z = (jnp.sqrt(self.eigvals[comp]) * noise)[:, None, :]
        if self.eigvecs is not None:
            z = jnp.einsum("bij,bj->bi", self.eigvecs[comp], z[:, 0])[:, None, :]
        x = self.means[comp] + z[:, 0]
        return x.reshape((num, *self.event_shape)), comp
