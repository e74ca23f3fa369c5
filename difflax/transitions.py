"""Transitions of the forward process between two times, and the one-step samplers built on them.

For ``x_t = alpha(t) x0 + sigma(t) eps`` write ``lambda = log(alpha / sigma)`` (half the
log-SNR) and, between a noisier time ``s`` and a cleaner time ``t``,
``h = lambda_t - lambda_s >= 0``, so ``e^{-h} = alpha_s sigma_t / (alpha_t sigma_s)``.
Kingma et al. 2021 ("Variational diffusion models", eq. 2-4 and 7-8), rewritten in ``lambda``:

* forward transition (noising from ``t`` to ``s``):
  ``q(x_s | x_t) = N((alpha_s / alpha_t) x_t, sigma_s^2 (1 - e^{-2h}))``;
* posterior (one ancestral step from ``s`` to ``t``, with ``eps_s = (x_s - alpha_s x0) / sigma_s``):
  ``q(x_t | x_s, x0) = N(alpha_t x0 + sigma_t e^{-h} eps_s, sigma_t^2 (1 - e^{-2h}))``; for a
  discrete VP table this is DDPM's ``beta~`` (Ho et al. 2020, eq. 7);
* the DDIM step (Song et al. 2021, "Denoising diffusion implicit models", eq. 12):
  ``x_t = alpha_t x0 + sqrt(sigma_t^2 - c^2) eps_s + c z`` with ``c = eta * posterior std``;
  ``eta = 0`` is the first-order exponential integrator of the probability-flow ODE,
  ``eta = 1`` the ancestral step.

Every coefficient is written so that it stays finite where ``alpha = 0`` or ``sigma = 0``
at one end (``1 - e^{-2h}`` by ``expm1``). Coefficients are scalars or arrays broadcastable
against ``x`` (see :func:`difflax.processes.broadcast_to` for per-example times).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from difflax.processes import broadcast_to

Array = jax.Array

__all__ = [
    "Coefficients",
    "coefficients",
    "ddim_step",
    "eps_from_x0",
    "exp_neg_h",
    "forward_std",
    "posterior_mean",
    "posterior_std",
]


class Coefficients(NamedTuple):
    """``alpha``, ``sigma`` and ``lambda = log(alpha / sigma)`` (half the log-SNR) at the time ``t``."""

    t: Array
    alpha: Array
    sigma: Array
    lam: Array


def coefficients(process, t, like: Array | None = None) -> Coefficients:
    """The :class:`Coefficients` of ``process`` at ``t``.

    ``t`` has any shape; with ``like`` it is a scalar or per-example ``(batch,)`` and the
    coefficients are broadcast against ``like`` (:func:`difflax.processes.broadcast_to`).
    """
    alpha, sigma = process.alpha_sigma(t)
    c = Coefficients(t=t, alpha=alpha, sigma=sigma, lam=0.5 * process.log_snr(t))
    return c if like is None else Coefficients(*(broadcast_to(v, like) for v in c))


def exp_neg_h(s: Coefficients, t: Coefficients) -> Array:
    """``e^{-h} = e^{-(lambda_t - lambda_s)} = alpha_s sigma_t / (alpha_t sigma_s)``, without forming infinities."""
    return (s.alpha * t.sigma) / (t.alpha * s.sigma)


def _one_minus_exp_neg_2h(s: Coefficients, t: Coefficients) -> Array:
    return -jnp.expm1(2.0 * jnp.log(exp_neg_h(s, t)))


def eps_from_x0(x, x0, c: Coefficients) -> Array:
    """``eps = (x - alpha x0) / sigma``."""
    return (x - c.alpha * x0) / c.sigma


def posterior_mean(x0, eps, s: Coefficients, t: Coefficients) -> Array:
    """Mean of ``q(x_t | x_s, x0)``: ``alpha_t x0 + sigma_t e^{-h} eps_s``."""
    return t.alpha * x0 + t.sigma * exp_neg_h(s, t) * eps


def posterior_std(s: Coefficients, t: Coefficients) -> Array:
    """Standard deviation of ``q(x_t | x_s, x0)``: ``sigma_t sqrt(1 - e^{-2h})`` (DDPM's ``sqrt(beta~)``)."""
    return t.sigma * jnp.sqrt(_one_minus_exp_neg_2h(s, t))


def forward_std(s: Coefficients, t: Coefficients) -> Array:
    """Standard deviation of the forward transition ``q(x_s | x_t)``: ``sigma_s sqrt(1 - e^{-2h})``.

    For a discrete VP table this is DDPM's ``sqrt(beta)``.
    """
    return s.sigma * jnp.sqrt(_one_minus_exp_neg_2h(s, t))


def ddim_step(x0, eps, t: Coefficients, std=0.0) -> Array:
    """The DDIM step to ``t`` before its noise: ``alpha_t x0 + sqrt(sigma_t^2 - std^2) eps``; add ``std z``."""
    return t.alpha * x0 + jnp.sqrt(jnp.maximum(t.sigma**2 - std**2, 0.0)) * eps
