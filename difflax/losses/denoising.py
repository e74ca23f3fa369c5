"""Denoising losses and their weightings (Ho et al. 2020; Kingma et al. 2021; Kingma & Gao 2023).

Conventions (``x_t = alpha(t) x0 + sigma(t) eps``, ``lambda = log_snr(t) = log(alpha^2 / sigma^2)``):

* Every loss returns one value per example, shape ``(batch,)``: the squared error is
  reduced over all non-batch axes with ``reduction="mean"`` (per dimension, the
  default) or ``"sum"`` (per example; with ``weighting="elbo"`` this is in nats).
* A weighting is defined once, as a weight ``w_eps(t)`` on the eps-MSE (the common
  currency of Kingma & Gao 2023, "Understanding diffusion objectives as the ELBO with
  simple data augmentation"), and converted to a prediction's own MSE with the exact
  ratio ``|eps error|^2 / |target error|^2`` at fixed ``x_t``:

  ==========  ===============================================  ============================
  prediction  ratio                                            why
  ==========  ===============================================  ============================
  eps         1
  x0          alpha^2 / sigma^2 = exp(lambda)                  x0 = (x_t - sigma eps) / alpha
  v           alpha^2 / (alpha^2 + sigma^2) = sigmoid(lambda)  eps = sigma_hat x_hat + alpha_hat v
  score       sigma^2                                          score = -eps / sigma
  velocity    alpha^2 / (alpha sigma' - sigma alpha')^2        eps = (alpha u - alpha' x_t) / det
  ==========  ===============================================  ============================

  so every weighting is parametrization-invariant: a network whose implied eps error
  is ``delta`` has loss ``w_eps * mean(delta^2)`` whatever it predicts. Each weighting
  also has a closed form on the x0-MSE, ``w_x0 = w_eps exp(lambda)``; the conversion
  uses ``w_eps`` where ``lambda >= 0`` and ``w_x0`` where ``lambda < 0``, so weights stay
  finite at ``alpha = 0`` (flow matching at ``t = 1``) and ``sigma = 0`` whenever the
  weight in the prediction's own space is finite there.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

from difflax import parametrization
from difflax.checks import check_batched, check_choice
from difflax.parametrization import check_prediction
from difflax.processes import Flow, Process, broadcast_to

Array = chex.Array

WEIGHTINGS = ("simple", "elbo", "snr", "min_snr", "edm", "snr+1")
REDUCTIONS = ("mean", "sum")

__all__ = ["REDUCTIONS", "WEIGHTINGS", "denoising_loss", "flow_matching_loss", "loss_weight"]


def reduce_per_example(x: Array, reduction: str) -> Array:
    """Mean (``reduction="mean"``) or sum (``"sum"``) over all axes but the first (batch) one."""
    axes = tuple(range(1, x.ndim))
    return jnp.mean(x, axis=axes) if reduction == "mean" else jnp.sum(x, axis=axes)


def _float_t(t) -> Array:
    return jnp.asarray(t, dtype=jnp.result_type(t, float))


def _eps_and_x0_weights(weighting, process, t, log_snr, sigma_data, gamma):
    """``(w_eps, w_x0)``: the weighting on the eps-MSE and on the x0-MSE (``w_x0 = w_eps e^lambda``).

    Both are returned in closed form so that each is finite where the other may not be.
    """
    if weighting == "snr":
        return jnp.ones_like(log_snr), jnp.exp(log_snr)
    if weighting == "min_snr":
        return jnp.minimum(1.0, gamma * jnp.exp(-log_snr)), jnp.minimum(jnp.exp(log_snr), gamma)
    if weighting == "edm":
        sd2 = jnp.asarray(sigma_data, log_snr.dtype) ** 2
        return 1.0 + jnp.exp(-log_snr) / sd2, jnp.exp(log_snr) + 1.0 / sd2
    if weighting == "snr+1":
        return 1.0 + jnp.exp(-log_snr), jnp.exp(log_snr) + 1.0
    # "elbo": w_eps = -1/2 d lambda / dt, by forward mode through the process's own log_snr.
    _, d_log_snr = jax.jvp(process.log_snr, (t,), (jnp.ones_like(t),))
    w_eps = -0.5 * d_log_snr
    snr = jnp.exp(log_snr)
    # As alpha -> 0, w_eps -> inf but w_x0 = alpha (alpha sigma' - sigma alpha') / sigma^3 -> 0.
    w_x0 = jnp.where(snr > 0, w_eps * snr, 0.0)
    return w_eps, w_x0


def loss_weight(
    process: Process,
    t,
    *,
    prediction: str = "eps",
    weighting: str = "simple",
    sigma_data: float | None = None,
    gamma: float = 5.0,
) -> Array:
    """The weight :func:`denoising_loss` puts on the MSE of ``prediction`` at time ``t`` (shape of ``t``).

    ``weighting`` is one of (``lambda = log_snr(t)``, ``SNR = exp(lambda)``):

    * ``"simple"``: 1 on the prediction's own MSE, whatever it is (DDPM's ``L_simple``
      for eps, Ho et al. 2020; conditional flow matching for velocity, Lipman et al. 2023).
    * ``"elbo"``: ``w_eps = -1/2 d lambda/dt``, the continuous-time VDM loss (Kingma et al.
      2021, eq. 17), equal to ``g(t)^2 / (2 sigma(t)^2)`` for the forward SDE, i.e. the
      likelihood weighting ``g^2`` of Song et al. 2021 ("Maximum likelihood training of
      score-based diffusion models") on the score MSE, times 1/2.
    * ``"snr"``: weight SNR on the x0-MSE, which is ``w_eps = 1`` (eps-MSE = SNR * x0-MSE).
    * ``"min_snr"``: Min-SNR-gamma (Hang et al. 2023), ``min(SNR, gamma)`` on the x0-MSE,
      ``w_eps = min(1, gamma / SNR)``.
    * ``"edm"``: Karras et al. 2022, ``lambda(s) = (s^2 + sd^2) / (s sd)^2`` on the x0-MSE
      with ``s = sigma / alpha`` the noise level of ``x_t / alpha``; ``w_eps = 1 + 1 / (SNR sd^2)``.
    * ``"snr+1"``: ``SNR + 1`` on the x0-MSE, ``w_eps = 1 + 1 / SNR``: the weighting
      implied by the v-MSE (Salimans & Ho 2022).

    ``sigma_data`` (``"edm"`` only) defaults to the process's ``sigma_data`` if it has
    one, else 0.5; ``gamma`` is the Min-SNR clip.
    """
    check_prediction(prediction)
    check_choice(weighting, WEIGHTINGS, "weighting")
    t = _float_t(t)
    if weighting == "simple":
        return jnp.ones_like(t)
    if sigma_data is None:
        sigma_data = getattr(process, "sigma_data", 0.5)
    log_snr = process.log_snr(t)
    w_eps, w_x0 = _eps_and_x0_weights(weighting, process, t, log_snr, sigma_data, gamma)
    positive = log_snr >= 0
    if prediction == "eps":
        return w_eps
    if prediction == "x0":
        return w_x0
    if prediction == "v":
        return jnp.where(positive, w_eps * jax.nn.sigmoid(log_snr), w_x0 * jax.nn.sigmoid(-log_snr))
    alpha, sigma = process.alpha_sigma(t)
    if prediction == "score":
        return w_eps * sigma**2
    d_alpha, d_sigma = process.alpha_sigma_derivatives(t)
    det = alpha * d_sigma - sigma * d_alpha
    # alpha^2 / det^2 on the eps side; w_x0 sigma^2 / det^2 = w_eps alpha^2 / det^2 on the x0 side.
    return jnp.where(positive, w_eps * alpha**2, w_x0 * sigma**2) / det**2


def denoising_loss(
    apply_fn: Callable[[Array, Array], Array],
    process: Process,
    x0: Array,
    t,
    eps: Array,
    *,
    prediction: str = "eps",
    weighting: str = "simple",
    sigma_data: float | None = None,
    gamma: float = 5.0,
    reduction: str = "mean",
) -> Array:
    """Weighted denoising loss, one value per example (shape ``(batch,)``).

    ``x_t = alpha(t) x0 + sigma(t) eps``, ``out = apply_fn(x_t, t)`` and::

        loss = w(t) * reduce((out - target)^2)

    where ``target`` is the ``prediction``'s value at ``(x0, eps)``: ``eps``; ``x0``;
    ``v = (alpha eps - sigma x0) / sqrt(alpha^2 + sigma^2)``; ``score = -eps / sigma``;
    ``velocity = alpha' x0 + sigma' eps``. ``reduce`` is the mean (``reduction="mean"``)
    or sum (``"sum"``) over the non-batch axes, and ``w(t)`` is
    :func:`loss_weight` (see there for the weightings, their sources, and the
    conversion that makes them the same objective for every prediction).

    With ``weighting="elbo"``, ``reduction="sum"`` and ``t ~ U[t_min, t_max]``,
    ``(t_max - t_min) E[loss] = 1/2 int_{t_min}^{t_max} -lambda'(t) E|eps - eps_hat|^2 dt``:
    the diffusion term of the negative ELBO in nats (Kingma et al. 2021), without the
    prior and reconstruction terms; ``reduction="mean"`` gives it per dimension.

    ``t`` is a scalar or has shape ``(batch,)``; ``eps`` has the shape of ``x0``.
    """
    check_prediction(prediction)
    check_choice(weighting, WEIGHTINGS, "weighting")
    check_choice(reduction, REDUCTIONS, "reduction")
    x0 = jnp.asarray(x0)
    eps = jnp.asarray(eps)
    check_batched(x0, "x0")
    t = _float_t(t)
    x_t = process.marginal(x0, t, eps)
    out = apply_fn(x_t, t)
    if jnp.shape(out) != x_t.shape:
        raise ValueError(f"apply_fn must return an array of the shape of x_t {x_t.shape}; got {jnp.shape(out)}.")
    alpha, sigma = process.alpha_sigma(t)
    d_alpha = d_sigma = None
    if prediction == "velocity":
        d_alpha, d_sigma = (broadcast_to(d, x0) for d in process.alpha_sigma_derivatives(t))
    target = parametrization.from_pair(
        x0, eps, prediction, broadcast_to(alpha, x0), broadcast_to(sigma, x0), d_alpha, d_sigma
    )
    err = reduce_per_example(jnp.square(out - target), reduction)
    weight = loss_weight(process, t, prediction=prediction, weighting=weighting, sigma_data=sigma_data, gamma=gamma)
    return weight * err


def flow_matching_loss(
    apply_fn: Callable[[Array, Array], Array], x0: Array, t, eps: Array, *, reduction: str = "mean"
) -> Array:
    """Conditional flow matching / rectified flow loss (Lipman et al. 2023; Liu et al. 2023).

    ``x_t = (1 - t) x0 + t eps`` and ``loss = reduce((u_theta(x_t, t) - (eps - x0))^2)``
    per example; ``reduction="sum"`` gives ``||u_theta - (eps - x0)||^2``. This is
    :func:`denoising_loss` with :class:`~difflax.processes.Flow`, ``prediction="velocity"``
    and ``weighting="simple"``.
    """
    return denoising_loss(apply_fn, Flow(), x0, t, eps, prediction="velocity", weighting="simple", reduction=reduction)
