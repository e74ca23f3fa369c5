"""The variational bound of discrete-time DDPM (Ho et al. 2020; Nichol & Dhariwal 2021).

This module works on :class:`difflax.processes.DiscreteVP` in its integer-step indexing
(Nichol & Dhariwal 2021, "Improved denoising diffusion probabilistic models"): step
``n = 0 .. N-1`` has ``alpha_bar_n = alphas_cumprod[n]``, ``beta_n = betas[n]``,
``alpha_bar_{-1} = 1``, and sits at process time ``t = (n + 1) / N``; networks are
always called with that process time. The bound is

    L_vlb = L_N + sum_{n=0}^{N-1} L_n,   L_N = KL(q(x_{N-1} | x0) || N(0, I)),
    L_n = KL(q(x_{n-1} | x_n, x0) || p(x_{n-1} | x_n)) (n > 0),   L_0 = -log p(x0 | x_0-step),

with the Gaussian posterior :func:`ddpm_posterior`, the reverse variance of
:func:`ddpm_model_log_variance` and the discretized decoder
:func:`discretized_gaussian_log_likelihood`; :func:`hybrid_loss` is iDDPM's
``L_simple + lambda L_vlb``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr

from difflax import parametrization
from difflax.checks import check_batched, check_choice, check_in_range
from difflax.losses.denoising import REDUCTIONS, reduce_per_example
from difflax.parametrization import check_prediction, to_x0
from difflax.processes import DiscreteVP, broadcast_to

Array = chex.Array

VARIANCE_KINDS = ("fixed_small", "fixed_large", "learned_range", "learned")
HYBRID_PREDICTIONS = ("eps", "x0", "v")

__all__ = [
    "HYBRID_PREDICTIONS",
    "VARIANCE_KINDS",
    "ddpm_model_log_variance",
    "ddpm_posterior",
    "ddpm_prior_kl",
    "ddpm_vlb",
    "ddpm_vlb_terms",
    "discretized_gaussian_log_likelihood",
    "hybrid_loss",
    "normal_kl",
]


def check_discrete(process, fn: str) -> None:
    """Raise a ``TypeError`` unless ``process`` is a :class:`~difflax.processes.DiscreteVP` (``fn`` needs one)."""
    if not isinstance(process, DiscreteVP):
        raise TypeError(
            f"{fn} needs a DiscreteVP process (integer DDPM steps); got process of type "
            f"{type(process).__name__}. Build one with DiscreteVP.linear / cosine / scaled_linear."
        )


def normal_kl(mean1, logvar1, mean2, logvar2) -> Array:
    """Elementwise ``KL(N(mean1, e^logvar1) || N(mean2, e^logvar2))`` in nats.

    ``1/2 (logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2 - 1)``.
    """
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(
    x: Array, mean: Array, log_scale: Array, num_bins: int = 256, min_prob: float = 1e-12
) -> Array:
    """Elementwise log-probability (nats) of the bin of ``x`` under ``N(mean, exp(log_scale)^2)``.

    The DDPM decoder ``p(x0 | x1)`` (Ho et al. 2020, eq. 13): data in ``[-1, 1]`` on
    ``num_bins`` levels ``-1 + 2 k / (num_bins - 1)``, bin width ``2 / (num_bins - 1)``,
    the two edge bins open-ended (``(-inf, -1 + h]`` and ``(1 - h, inf)``, ``h`` the
    half width), so the bin probabilities sum to one. Interior bins are computed as
    ``log(Phi(b) - Phi(a))`` reflected into the lower tail and written as
    ``log Phi(b) + log(1 - Phi(a) / Phi(b))`` with ``log_ndtr``, accurate far in either
    tail; the probability is clamped below at ``min_prob`` as in iDDPM (1e-12).
    """
    x, mean, log_scale = jnp.asarray(x), jnp.asarray(mean), jnp.asarray(log_scale)
    dtype = jnp.result_type(x, mean, log_scale, float)
    half = 1.0 / (num_bins - 1)
    big = 1e18  # keeps log_ndtr finite (|z|^2 / 2 < float32 max) for absurdly small scales
    centered = (x - mean).astype(dtype)
    inv_std = jnp.exp(-log_scale).astype(dtype)
    upper = jnp.clip(inv_std * (centered + half), -big, big)
    lower = jnp.clip(inv_std * (centered - half), -big, big)
    # Reflect so that the bin is P(lo < Z <= hi) with lo < 0: the lower tail, where log_ndtr is accurate.
    flip = centered > 0
    hi = jnp.where(flip, -lower, upper)
    lo = jnp.where(flip, -upper, lower)
    log_hi = log_ndtr(hi)
    log_lo = log_ndtr(lo)
    frac = -jnp.expm1(jnp.minimum(log_lo - log_hi, 0.0))
    log_mid = log_hi + jnp.log(jnp.maximum(frac, jnp.finfo(dtype).tiny))
    log_not_lo = jnp.log1p(-jnp.exp(log_lo))  # log P(Z > lo), Phi(lo) < 1/2
    log_first = jnp.where(flip, log_not_lo, log_hi)  # log P(Z <= upper)
    log_last = jnp.where(flip, log_hi, log_not_lo)  # log P(Z > lower)
    log_probs = jnp.where(x < -1.0 + half, log_first, jnp.where(x > 1.0 - half, log_last, log_mid))
    return jnp.maximum(log_probs, math.log(min_prob))


class _DDPMTables(NamedTuple):
    sqrt_abar: Array  # sqrt(alpha_bar_n)
    sqrt_one_minus_abar: Array  # sqrt(1 - alpha_bar_n)
    log_beta: Array
    beta_tilde: Array  # (1 - abar_{n-1}) / (1 - abar_n) beta_n, 0 at n = 0
    log_beta_tilde_clipped: Array  # log beta_tilde with beta_tilde_1 used at n = 0
    coef_x0: Array  # beta_n sqrt(abar_{n-1}) / (1 - abar_n)
    coef_xt: Array  # (1 - abar_{n-1}) sqrt(1 - beta_n) / (1 - abar_n)


def _ddpm_tables(process: DiscreteVP) -> _DDPMTables:
    """All per-step DDPM constants, from the log alpha-bar table (no 1 - x cancellation)."""
    la = process.log_alpha_bar
    la_n, la_prev = la[1:], la[:-1]
    log_alpha = la_n - la_prev  # log(1 - beta_n)
    beta = -jnp.expm1(log_alpha)
    one_minus_abar = -jnp.expm1(la_n)
    one_minus_abar_prev = -jnp.expm1(la_prev)
    beta_tilde = beta * one_minus_abar_prev / one_minus_abar
    return _DDPMTables(
        sqrt_abar=jnp.exp(0.5 * la_n),
        sqrt_one_minus_abar=jnp.sqrt(one_minus_abar),
        log_beta=jnp.log(beta),
        beta_tilde=beta_tilde,
        log_beta_tilde_clipped=jnp.log(jnp.concatenate([beta_tilde[1:2], beta_tilde[1:]])),
        coef_x0=beta * jnp.exp(0.5 * la_prev) / one_minus_abar,
        coef_xt=one_minus_abar_prev * jnp.exp(0.5 * log_alpha) / one_minus_abar,
    )


def _check_steps(n, process: DiscreteVP) -> Array:
    n = jnp.asarray(n)
    if not jnp.issubdtype(n.dtype, jnp.integer):
        raise TypeError(
            f"n must hold integer DDPM steps in [0, {process.num_steps - 1}]; got dtype {n.dtype} "
            "(use sample_ddpm_steps(..., return_steps=True) or round(process.timestep(t)))."
        )
    if n.ndim > 1:
        raise ValueError(f"n must be a scalar or have shape (batch,); got shape {n.shape}.")
    check_in_range(n, 0, process.num_steps - 1, "n")
    return n


def _take(table: Array, n: Array, like: Array | None = None) -> Array:
    out = jnp.take(table, n)
    return out if like is None else broadcast_to(out, like)


def _ddpm_alpha_sigma(process: DiscreteVP, n: Array, like: Array):
    """``sqrt(alpha_bar_n)``, ``sqrt(1 - alpha_bar_n)`` broadcast against ``like``."""
    tab = _ddpm_tables(process)
    return _take(tab.sqrt_abar, n, like), _take(tab.sqrt_one_minus_abar, n, like)


def ddpm_posterior(process: DiscreteVP, x0: Array, x_t: Array, n) -> tuple[Array, Array, Array]:
    """``(mean, variance, log_variance_clipped)`` of ``q(x_{n-1} | x_n, x0)`` (Ho et al. 2020, eq. 6-7).

    ``mean = beta_n sqrt(abar_{n-1}) / (1 - abar_n) x0 + (1 - abar_{n-1}) sqrt(1 - beta_n) / (1 - abar_n) x_n``,
    ``variance = beta_tilde_n = (1 - abar_{n-1}) / (1 - abar_n) beta_n`` (0 at ``n = 0``,
    where ``abar_{-1} = 1``), and ``log_variance_clipped`` is ``log beta_tilde_n`` with
    ``beta_tilde_1`` used at ``n = 0`` (iDDPM). ``n`` (integer, scalar or ``(batch,)``) is
    the step of ``x_t``; variance and log variance come back with singleton axes
    appended, broadcastable against ``x0``.
    """
    check_discrete(process, "ddpm_posterior")
    x0, x_t = jnp.asarray(x0), jnp.asarray(x_t)
    check_batched(x0, "x0")
    if x0.shape != x_t.shape:
        raise ValueError(f"x_t must have the shape of x0 {x0.shape}; got {x_t.shape}.")
    n = _check_steps(n, process)
    tab = _ddpm_tables(process)
    mean = _take(tab.coef_x0, n, x0) * x0 + _take(tab.coef_xt, n, x0) * x_t
    return mean, _take(tab.beta_tilde, n, x0), _take(tab.log_beta_tilde_clipped, n, x0)


def ddpm_model_log_variance(process: DiscreteVP, n, var_output: Array | None = None, kind: str = "fixed_small"):
    """Log variance of the reverse step ``p(x_{n-1} | x_n)`` (iDDPM's conventions).

    * ``"fixed_small"``: ``log beta_tilde_n`` (clipped: ``beta_tilde_1`` at ``n = 0``).
    * ``"fixed_large"``: ``log beta_n``, with ``beta_tilde_1`` at ``n = 0`` as in the iDDPM
      code (``log(append(beta_tilde[1], betas[1:]))``).
    * ``"learned_range"``: ``var_output = v in [-1, 1]``, ``frac = (v + 1) / 2``, log variance
      ``frac log beta_n + (1 - frac) log beta_tilde_n`` (clipped), Nichol & Dhariwal 2021 eq. 15.
    * ``"learned"``: ``var_output`` is the log variance itself.

    Fixed kinds return the shape of ``n``; learned kinds the shape of ``var_output``
    (whose leading axis is the batch), and need it.
    """
    check_discrete(process, "ddpm_model_log_variance")
    check_choice(kind, VARIANCE_KINDS, "kind")
    n = _check_steps(n, process)
    learned = kind in ("learned_range", "learned")
    if learned and var_output is None:
        raise ValueError(f"var_output is required for kind={kind!r} (the network's variance channel).")
    if not learned and var_output is not None:
        raise ValueError(f"var_output is only used with kind='learned_range' or 'learned'; got kind={kind!r}.")
    tab = _ddpm_tables(process)
    if kind == "fixed_small":
        return _take(tab.log_beta_tilde_clipped, n)
    if kind == "fixed_large":
        return _take(jnp.concatenate([tab.log_beta_tilde_clipped[1:2], tab.log_beta[1:]]), n)
    var_output = jnp.asarray(var_output)
    if kind == "learned":
        return var_output
    frac = 0.5 * (var_output + 1.0)
    max_log = _take(tab.log_beta, n, var_output)
    min_log = _take(tab.log_beta_tilde_clipped, n, var_output)
    return frac * max_log + (1.0 - frac) * min_log


def _broadcast_log_variance(log_var, x):
    log_var = jnp.asarray(log_var)
    return log_var if log_var.ndim == x.ndim else broadcast_to(log_var, x)


def ddpm_vlb_terms(
    process: DiscreteVP,
    x0: Array,
    x_t: Array,
    n,
    x0_hat: Array,
    model_log_variance,
    *,
    reduction: str = "mean",
    bits: bool = False,
    num_bins: int = 256,
) -> Array:
    """One term of the DDPM variational bound per example, shape ``(batch,)`` (nats; bits if ``bits``).

    With ``p(x_{n-1} | x_n) = N(mu_theta, exp(model_log_variance))`` and ``mu_theta`` the
    posterior-mean formula of :func:`ddpm_posterior` evaluated at ``x0_hat``:

    * ``n > 0``: ``L_n = KL(q(x_{n-1} | x_n, x0) || p(x_{n-1} | x_n))``,
    * ``n = 0``: ``L_0 = -log p(x0 | x_0-step)``, the discretized Gaussian decoder of
      :func:`discretized_gaussian_log_likelihood` with mean ``mu_theta`` and
      ``log_scale = model_log_variance / 2`` (``x0`` must lie on the ``num_bins`` grid in ``[-1, 1]``).

    ``reduction="mean"`` averages over the non-batch axes (iDDPM's ``mean_flat``: nats
    or bits per dimension), ``"sum"`` sums (per example). Selection between the two
    cases is by ``jnp.where``, so ``n`` may be a traced ``(batch,)`` vector.
    ``model_log_variance`` has the shape of ``x0`` or of ``n`` (see
    :func:`ddpm_model_log_variance`).
    """
    check_choice(reduction, REDUCTIONS, "reduction")
    x0_hat = jnp.asarray(x0_hat)
    if x0_hat.shape != jnp.shape(x0):
        raise ValueError(f"x0_hat must have the shape of x0 {jnp.shape(x0)}; got {x0_hat.shape}.")
    true_mean, _, true_log_var = ddpm_posterior(process, x0, x_t, n)
    model_mean, _, _ = ddpm_posterior(process, x0_hat, x_t, n)
    x0 = jnp.asarray(x0)
    model_log_var = _broadcast_log_variance(model_log_variance, x0)
    kl = reduce_per_example(normal_kl(true_mean, true_log_var, model_mean, model_log_var), reduction)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var, num_bins)
    nll = reduce_per_example(nll, reduction)
    out = jnp.where(jnp.asarray(n) == 0, nll, kl)
    return out / math.log(2.0) if bits else out


def ddpm_prior_kl(process: DiscreteVP, x0: Array, *, reduction: str = "mean", bits: bool = False) -> Array:
    """``L_N = KL(q(x_{N-1} | x0) || N(0, I))`` per example (nats; bits if ``bits``).

    ``q(x_{N-1} | x0) = N(sqrt(abar_{N-1}) x0, (1 - abar_{N-1}) I)``; reduced as in :func:`ddpm_vlb_terms`.
    """
    check_discrete(process, "ddpm_prior_kl")
    check_choice(reduction, REDUCTIONS, "reduction")
    x0 = jnp.asarray(x0)
    check_batched(x0, "x0")
    la = process.log_alpha_bar[-1]
    kl = normal_kl(jnp.exp(0.5 * la) * x0, jnp.log(-jnp.expm1(la)), 0.0, 0.0)
    out = reduce_per_example(kl, reduction)
    return out / math.log(2.0) if bits else out


def ddpm_vlb(
    denoise_and_logvar: Callable[[Array, Array], tuple[Array, Array]],
    process: DiscreteVP,
    x0: Array,
    key: Array,
    *,
    reduction: str = "mean",
    bits: bool = False,
    num_bins: int = 256,
    return_terms: bool = False,
):
    """Full DDPM variational bound ``L_N + sum_{n=0}^{N-1} L_n`` per example (a one-sample estimate).

    Arguments:
      denoise_and_logvar: ``(x_t, t) -> (x0_hat, model_log_variance)``, called with a
        batch ``x_t`` at step ``n`` and its process time ``t = (n + 1) / N`` of shape
        ``(batch,)``; ``model_log_variance`` has the shape of ``x_t`` or ``(batch,)``
        (e.g. from :func:`ddpm_model_log_variance` with ``n = round(process.timestep(t))``).
      process: the ``DiscreteVP``.
      x0: data batch on the ``num_bins`` grid in ``[-1, 1]``, shape ``(batch, ...)``.
      key: PRNG key; every step draws its own ``eps`` and ``x_n = sqrt(abar_n) x0 + sqrt(1 - abar_n) eps``.
      reduction, bits, num_bins: as in :func:`ddpm_vlb_terms`.
      return_terms: also return ``{"prior": (batch,), "terms": (N, batch)}``.

    Returns the bound, shape ``(batch,)`` (with ``reduction="mean"`` and ``bits=True``
    this is bits/dim, iDDPM's ``calc_bpd_loop``), or ``(bound, terms)``. The steps run in
    one ``lax.scan``, so the function jits with ``denoise_and_logvar`` inlined.
    """
    check_discrete(process, "ddpm_vlb")
    x0 = jnp.asarray(x0)
    check_batched(x0, "x0")
    batch = x0.shape[0]
    num = process.num_steps
    tab = _ddpm_tables(process)

    def step(total, inputs):
        n, k = inputs
        n_b = jnp.full((batch,), n)
        eps = jax.random.normal(k, x0.shape, x0.dtype)
        x_t = _take(tab.sqrt_abar, n_b, x0) * x0 + _take(tab.sqrt_one_minus_abar, n_b, x0) * eps
        x0_hat, log_var = denoise_and_logvar(x_t, process.time_from_timestep(n_b))
        term = ddpm_vlb_terms(process, x0, x_t, n_b, x0_hat, log_var, reduction=reduction, bits=bits, num_bins=num_bins)
        return total + term, term

    zero = jnp.zeros((batch,), jnp.result_type(x0, float))
    total, terms = jax.lax.scan(step, zero, (jnp.arange(num), jax.random.split(key, num)))
    prior = ddpm_prior_kl(process, x0, reduction=reduction, bits=bits)
    total = total + prior
    return (total, {"prior": prior, "terms": terms}) if return_terms else total


def hybrid_loss(
    apply_fn: Callable[[Array, Array], Array],
    process: DiscreteVP,
    x0: Array,
    n,
    eps: Array,
    *,
    lambda_vlb: float = 1e-3,
    prediction: str = "eps",
    var_kind: str = "learned_range",
    bits: bool = True,
    num_bins: int = 256,
    return_terms: bool = False,
):
    """iDDPM's hybrid objective ``L_simple + lambda_vlb L_vlb`` (Nichol & Dhariwal 2021, sec. 3.1).

    ``x_n = sqrt(abar_n) x0 + sqrt(1 - abar_n) eps`` and ``apply_fn(x_n, t)``, with
    ``t = (n + 1) / N`` the process time, returns ``concat([pred, var_output], -1)``:
    twice the channels of ``x0`` on the last axis, ``pred`` the ``prediction``
    (``"eps"``, ``"x0"`` or ``"v"``) and ``var_output`` the variance channel read by
    :func:`ddpm_model_log_variance` with ``kind=var_kind`` (``"learned_range"`` or
    ``"learned"``). Per example::

        loss = mean((pred - target)^2) + lambda_vlb * N * L_n(x0_hat = sg(x0 implied by pred), var_output)

    ``sg`` is ``jax.lax.stop_gradient``: the bound term trains only the variance, the
    mean is trained by ``L_simple``. ``N * L_n`` with ``n ~ U{0..N-1}`` is an unbiased
    estimate of ``L_vlb = sum_n L_n`` (without the constant prior term), so
    ``lambda_vlb`` is the paper's lambda; with ``bits=True`` (default, ``L_n`` in bits
    per dimension), ``N = 1000`` and ``lambda_vlb = 1e-3`` this is exactly the iDDPM code's
    ``mse + vb``. ``n`` holds integer steps (see :func:`sample_ddpm_steps`).
    With ``return_terms=True`` returns ``(loss, {"mse": ..., "vlb": L_n})``.
    """
    check_discrete(process, "hybrid_loss")
    check_prediction(prediction, HYBRID_PREDICTIONS)
    if var_kind not in ("learned_range", "learned"):
        raise ValueError(
            f"Unknown var_kind {var_kind!r} for hybrid_loss; expected 'learned_range' or 'learned' "
            "(with a fixed variance the bound term has no gradient: use denoising_loss)."
        )
    x0, eps = jnp.asarray(x0), jnp.asarray(eps)
    check_batched(x0, "x0")
    if x0.shape != eps.shape:
        raise ValueError(f"eps must have the shape of x0 {x0.shape}; got {eps.shape}.")
    n = _check_steps(n, process)
    alpha, sigma = _ddpm_alpha_sigma(process, n, x0)
    x_t = alpha * x0 + sigma * eps
    out = apply_fn(x_t, process.time_from_timestep(n))
    expected = (*x0.shape[:-1], 2 * x0.shape[-1])
    if jnp.shape(out) != expected:
        raise ValueError(
            f"apply_fn must return shape {expected} (prediction and variance channels concatenated "
            f"on the last axis) for x0 of shape {x0.shape}; got {jnp.shape(out)}."
        )
    pred, var_output = jnp.split(out, 2, axis=-1)
    target = parametrization.from_pair(x0, eps, prediction, alpha, sigma, None, None)
    mse = reduce_per_example(jnp.square(pred - target), "mean")
    x0_hat = to_x0(jax.lax.stop_gradient(pred), prediction, x_t, alpha, sigma)
    log_var = ddpm_model_log_variance(process, n, var_output, kind=var_kind)
    vlb = ddpm_vlb_terms(process, x0, x_t, n, x0_hat, log_var, reduction="mean", bits=bits, num_bins=num_bins)
    loss = mse + lambda_vlb * process.num_steps * vlb
    return (loss, {"mse": mse, "vlb": vlb}) if return_terms else loss
