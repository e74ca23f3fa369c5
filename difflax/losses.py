"""Training losses for diffusion and flow models, noise-level samplers and the discrete DDPM bound.

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

The discrete DDPM part (Ho et al. 2020; Nichol & Dhariwal 2021, "Improved denoising
diffusion probabilistic models") works on :class:`difflax.processes.DiscreteVP` in its
integer-step indexing: step ``n = 0 .. N-1`` has ``alpha_bar_n = alphas_cumprod[n]``,
``beta_n = betas[n]``, ``alpha_bar_{-1} = 1``, and sits at process time
``t = (n + 1) / N``; networks are always called with that process time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr

from difflax import parametrization
from difflax.parametrization import check_prediction, to_x0
from difflax.processes import DiscreteVP, Flow, Process, broadcast_to

Array = chex.Array

WEIGHTINGS = ("simple", "elbo", "snr", "min_snr", "edm", "snr+1")
REDUCTIONS = ("mean", "sum")
VARIANCE_KINDS = ("fixed_small", "fixed_large", "learned_range", "learned")
HYBRID_PREDICTIONS = ("eps", "x0", "v")

__all__ = [
    "HYBRID_PREDICTIONS",
    "REDUCTIONS",
    "VARIANCE_KINDS",
    "WEIGHTINGS",
    "ddpm_model_log_variance",
    "ddpm_posterior",
    "ddpm_prior_kl",
    "ddpm_vlb",
    "ddpm_vlb_terms",
    "denoising_loss",
    "discretized_gaussian_log_likelihood",
    "drop_condition",
    "flow_matching_loss",
    "hybrid_loss",
    "loss_weight",
    "normal_kl",
    "sample_ddpm_steps",
    "sample_t_edm",
    "sample_t_logsnr_uniform",
    "sample_t_uniform",
]


# ----------------------------------------------------------------------------------------------
# Helpers.


def _float_t(t) -> Array:
    return jnp.asarray(t, dtype=jnp.result_type(t, float))


def _reduce(x: Array, reduction: str) -> Array:
    """Mean or sum over all axes but the first (batch) one."""
    axes = tuple(range(1, x.ndim))
    return jnp.mean(x, axis=axes) if reduction == "mean" else jnp.sum(x, axis=axes)


def _check_batched(x, name: str) -> None:
    if jnp.ndim(x) < 1:
        raise ValueError(f"{name} must have a leading batch axis; got a scalar.")


def _concrete(x):
    """``x`` as a Python/NumPy value, or ``None`` if it is traced."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def _default_float():
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def _as_shape(shape, name: str = "shape") -> tuple[int, ...]:
    if isinstance(shape, int):
        return (shape,)
    try:
        return tuple(int(s) for s in shape)
    except TypeError as err:
        raise TypeError(f"{name} must be an int or a tuple of ints; got {shape!r}.") from err


# ----------------------------------------------------------------------------------------------
# Continuous-time denoising losses.


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
    check_prediction(weighting, WEIGHTINGS, name="weighting")
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
    check_prediction(weighting, WEIGHTINGS, name="weighting")
    check_prediction(reduction, REDUCTIONS, name="reduction")
    x0 = jnp.asarray(x0)
    eps = jnp.asarray(eps)
    _check_batched(x0, "x0")
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
    err = _reduce(jnp.square(out - target), reduction)
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


def drop_condition(key: Array, y, p_uncond, null, *, return_mask: bool = False):
    """Condition dropout for classifier-free guidance training (Ho & Salimans 2021, alg. 1).

    Each example's condition is replaced by the null condition with probability
    ``p_uncond`` (the paper: 0.1 or 0.2), so one network learns both ``D(x_t, t, y)`` and
    ``D(x_t, t, null)``. ``y`` is a pytree whose leaves carry the batch axis (labels
    ``(batch,)``, embeddings ``(batch, ...)``); ``null`` is a null label id or a null
    embedding, broadcast as in :func:`difflax.guidance.null_like`. ``p_uncond`` may be
    traced. With ``return_mask`` also returns the boolean ``(batch,)`` mask of dropped examples.
    """
    from difflax.guidance import null_like  # guidance builds on the solvers; import lazily

    leaves = jax.tree.leaves(y)
    if not leaves or any(jnp.ndim(leaf) < 1 for leaf in leaves):
        raise ValueError("y must be a pytree of arrays with a leading batch axis.")
    batch = jnp.shape(leaves[0])[0]
    if any(jnp.shape(leaf)[0] != batch for leaf in leaves):
        raise ValueError(f"y: every leaf must have the same batch size; got {[jnp.shape(v) for v in leaves]}.")
    p = _concrete(p_uncond)
    if p is not None and not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"p_uncond must lie in [0, 1]; got {float(p)}.")
    drop = jax.random.uniform(key, (batch,)) < p_uncond
    nulls = null_like(null, y)
    out = jax.tree.map(lambda a, n: jnp.where(drop.reshape((batch,) + (1,) * (jnp.ndim(a) - 1)), n, a), y, nulls)
    return (out, drop) if return_mask else out


# ----------------------------------------------------------------------------------------------
# Noise-level samplers.


def sample_t_uniform(key: Array, shape, process: Process, antithetic: bool = False, dtype=None) -> Array:
    """``t ~ U[t_min, t_max]`` of shape ``shape``.

    With ``antithetic=True`` the draws are the low-discrepancy set of VDM (Kingma et al.
    2021, appendix): one ``u0 ~ U[0, 1)`` and ``u_i = mod(u0 + i / B, 1)`` for the
    ``B = prod(shape)`` entries (in row-major order), each marginally uniform, jointly
    evenly spaced, which lowers the variance of the batch-mean loss.
    """
    shape = _as_shape(shape)
    dtype = dtype or _default_float()
    if antithetic:
        size = math.prod(shape)
        u0 = jax.random.uniform(key, (), dtype)
        u = jnp.mod(u0 + jnp.arange(size, dtype=dtype) / size, 1.0).reshape(shape)
    else:
        u = jax.random.uniform(key, shape, dtype)
    return process.t_min + (process.t_max - process.t_min) * u


def _check_log_snr_bound(value, name: str, default_from: str) -> None:
    v = _concrete(value)
    if v is not None and not bool(jnp.all(jnp.isfinite(v))):
        raise ValueError(
            f"{name} must be finite; got {v} ({default_from}). Pass a finite {name} "
            "(for Flow, whose log-SNR is infinite at t = 1, e.g. log_snr_min=-15)."
        )


def sample_t_logsnr_uniform(
    key: Array, shape, process: Process, log_snr_min=None, log_snr_max=None, dtype=None
) -> Array:
    """``t`` whose log-SNR is uniform on ``[log_snr_min, log_snr_max]``, mapped back by ``t_from_log_snr``.

    The bounds default to the process's ends, ``log_snr(t_max)`` and ``log_snr(t_min)``;
    with the defaults ``t`` is clipped to ``[t_min, t_max]`` (only rounding is removed).
    Infinite bounds (Flow at ``t_max = 1``) raise a ``ValueError``: pass finite ones.
    """
    shape = _as_shape(shape)
    dtype = dtype or _default_float()
    defaults = log_snr_min is None and log_snr_max is None
    lo = process.log_snr(jnp.asarray(process.t_max, dtype)) if log_snr_min is None else jnp.asarray(log_snr_min, dtype)
    hi = process.log_snr(jnp.asarray(process.t_min, dtype)) if log_snr_max is None else jnp.asarray(log_snr_max, dtype)
    _check_log_snr_bound(lo, "log_snr_min", "default log_snr(t_max)" if log_snr_min is None else "given")
    _check_log_snr_bound(hi, "log_snr_max", "default log_snr(t_min)" if log_snr_max is None else "given")
    lo_c, hi_c = _concrete(lo), _concrete(hi)
    if lo_c is not None and hi_c is not None and lo_c > hi_c:
        raise ValueError(f"log_snr_min ({lo_c}) must not exceed log_snr_max ({hi_c}).")
    log_snr = lo + (hi - lo) * jax.random.uniform(key, shape, dtype)
    t = process.t_from_log_snr(log_snr)
    if defaults:
        t = jnp.clip(t, process.t_min, process.t_max)
    return t


def sample_t_edm(key: Array, shape, process: Process, p_mean: float = -1.2, p_std: float = 1.2, dtype=None) -> Array:
    """EDM's log-normal noise levels (Karras et al. 2022, sec. 5): ``ln s ~ N(p_mean, p_std^2)``.

    ``s = sigma / alpha`` is the noise level of ``x_t / alpha``, mapped to process time
    by ``t = t_from_log_snr(-2 ln s)`` (for the EDM process ``t = s``). As in EDM, the
    draws are not clipped to ``[t_min, t_max]`` (a DiscreteVP's ``t_from_log_snr`` clamps
    to ``[0, 1]`` itself).
    """
    shape = _as_shape(shape)
    dtype = dtype or _default_float()
    log_s = p_mean + p_std * jax.random.normal(key, shape, dtype)
    return process.t_from_log_snr(-2.0 * log_s)


def _check_discrete(process, fn: str) -> None:
    if not isinstance(process, DiscreteVP):
        raise TypeError(
            f"{fn} needs a DiscreteVP process (integer DDPM steps); got process of type "
            f"{type(process).__name__}. Build one with DiscreteVP.linear / cosine / scaled_linear."
        )


def sample_ddpm_steps(key: Array, shape, process: DiscreteVP, return_steps: bool = False):
    """Uniform integer DDPM steps ``n in {0, .., N-1}``, returned as process time ``t = (n + 1) / N``.

    With ``return_steps=True`` returns ``(t, n)``. ``process`` must be a ``DiscreteVP``.
    """
    _check_discrete(process, "sample_ddpm_steps")
    shape = _as_shape(shape)
    n = jax.random.randint(key, shape, 0, process.num_steps)
    t = process.time_from_timestep(n)
    return (t, n) if return_steps else t


# ----------------------------------------------------------------------------------------------
# Discrete DDPM variational bound (Ho et al. 2020; Nichol & Dhariwal 2021).


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
    c = _concrete(n)
    if c is not None and c.size and (c.min() < 0 or c.max() >= process.num_steps):
        raise ValueError(f"n must lie in [0, {process.num_steps - 1}]; got values in [{c.min()}, {c.max()}].")
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
    _check_discrete(process, "ddpm_posterior")
    x0, x_t = jnp.asarray(x0), jnp.asarray(x_t)
    _check_batched(x0, "x0")
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
    _check_discrete(process, "ddpm_model_log_variance")
    check_prediction(kind, VARIANCE_KINDS, name="kind")
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
    check_prediction(reduction, REDUCTIONS, name="reduction")
    x0_hat = jnp.asarray(x0_hat)
    if x0_hat.shape != jnp.shape(x0):
        raise ValueError(f"x0_hat must have the shape of x0 {jnp.shape(x0)}; got {x0_hat.shape}.")
    true_mean, _, true_log_var = ddpm_posterior(process, x0, x_t, n)
    model_mean, _, _ = ddpm_posterior(process, x0_hat, x_t, n)
    x0 = jnp.asarray(x0)
    model_log_var = _broadcast_log_variance(model_log_variance, x0)
    kl = _reduce(normal_kl(true_mean, true_log_var, model_mean, model_log_var), reduction)
    nll = _reduce(-discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var, num_bins), reduction)
    out = jnp.where(jnp.asarray(n) == 0, nll, kl)
    return out / math.log(2.0) if bits else out


def ddpm_prior_kl(process: DiscreteVP, x0: Array, *, reduction: str = "mean", bits: bool = False) -> Array:
    """``L_N = KL(q(x_{N-1} | x0) || N(0, I))`` per example (nats; bits if ``bits``).

    ``q(x_{N-1} | x0) = N(sqrt(abar_{N-1}) x0, (1 - abar_{N-1}) I)``; reduced as in :func:`ddpm_vlb_terms`.
    """
    _check_discrete(process, "ddpm_prior_kl")
    check_prediction(reduction, REDUCTIONS, name="reduction")
    x0 = jnp.asarray(x0)
    _check_batched(x0, "x0")
    la = process.log_alpha_bar[-1]
    kl = normal_kl(jnp.exp(0.5 * la) * x0, jnp.log(-jnp.expm1(la)), 0.0, 0.0)
    out = _reduce(kl, reduction)
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
    _check_discrete(process, "ddpm_vlb")
    x0 = jnp.asarray(x0)
    _check_batched(x0, "x0")
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
    _check_discrete(process, "hybrid_loss")
    check_prediction(prediction, HYBRID_PREDICTIONS)
    if var_kind not in ("learned_range", "learned"):
        raise ValueError(
            f"Unknown var_kind {var_kind!r} for hybrid_loss; expected 'learned_range' or 'learned' "
            "(with a fixed variance the bound term has no gradient: use denoising_loss)."
        )
    x0, eps = jnp.asarray(x0), jnp.asarray(eps)
    _check_batched(x0, "x0")
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
    mse = _reduce(jnp.square(pred - target), "mean")
    x0_hat = to_x0(jax.lax.stop_gradient(pred), prediction, x_t, alpha, sigma)
    log_var = ddpm_model_log_variance(process, n, var_output, kind=var_kind)
    vlb = ddpm_vlb_terms(process, x0, x_t, n, x0_hat, log_var, reduction="mean", bits=bits, num_bins=num_bins)
    loss = mse + lambda_vlb * process.num_steps * vlb
    return (loss, {"mse": mse, "vlb": vlb}) if return_terms else loss
