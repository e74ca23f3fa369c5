"""Exact log-likelihoods, bits/dim and ODE encoding through the probability-flow ODE.

The probability-flow ODE ``dx/dt = v(x, t)`` (Song et al. 2021, eq. 13) is a
continuous normalizing flow, so by the instantaneous change of variables
(Chen et al. 2018; FFJORD, Grathwohl et al. 2019; Song et al. 2021, appendix D.2)

    ``log p_0(x(t_0)) = log p_T(x(T)) + int_{t_0}^{T} div v(x(t), t) dt``.

:func:`log_likelihood` integrates ``[x, int div v]`` from ``t_min`` to ``t_max``
with diffrax, in the flow coordinates of :mod:`difflax.solvers.adaptive`
(``z = x / (alpha + sigma)``, ``r = sigma / (alpha + sigma)``, ``dz/dr = (z - D) / r``),
and converts back: with ``c = alpha + sigma``,

    ``log p_{t_min}(x) = log p_T(x_T) + int_{r_min}^{r_max} div_z (dz/dr) dr + D log(c(t_max) / c(t_min))``,

``D`` the number of dimensions of one example. The divergence is

* ``divergence="exact"``: the trace of the Jacobian from ``D`` forward-mode
  Jacobian-vector products (``vmap`` of ``jvp`` over the basis vectors; cost ``D``
  denoiser JVPs per evaluation, for small ``D``), or
* ``divergence="hutchinson"``: the Skilling-Hutchinson estimator ``v^T J v`` averaged
  over ``probes`` Rademacher or Gaussian probes ``v``, drawn once per solve and held
  fixed along the trajectory (FFJORD), which is unbiased for the log-likelihood
  because the trajectory does not depend on the probes.

What it computes. The result is the log-density of the *model's* marginal at
``t_min`` (``p_{t_min}``, not ``p_0``): score_sde evaluates likelihoods from
``eps = 1e-5`` (VE) or ``1e-3`` (VP) for the same reason. The prior is
``N(0, sigma(t_max)^2 I)``, the distribution :meth:`Process.prior_sample` draws from;
the true marginal at ``t_max`` is the data convolved with ``N(0, sigma^2)`` and
scaled by ``alpha(t_max)``, and the mismatch is

    ``log p_T(x_T) - log N(x_T; 0, sigma_T^2) ~ alpha_T <x_T, E[x0]> / sigma_T^2 + O(alpha_T^2 |x0|^2 / sigma_T^2)``

per example: zero for the flow interpolant (``alpha(1) = 0``), about
``alpha_T |mean| ~ 7e-3`` nats per dimension for score_sde's VP (``alpha(1) ~ 6.6e-3``)
with data of mean ~1 (only second order for centred data), and
``|mean| / sigma_max`` for VE. Pass ``prior_logp`` for an exact prior when that matters.

Bits per dimension (:func:`bits_per_dim`): for 8-bit data mapped to ``[-1, 1]``
and uniformly dequantized (:func:`dequantize`; Theis et al. 2016, Ho et al. 2020,
Song et al. 2021), a density ``p(x)`` on ``[-1, 1]^D`` is, in the units of the
integer pixel values (bins of width 1, i.e. ``y = (x + 1) num_bins / data_range``),
``log p_y = log p_x - D log(num_bins / data_range)``, so

    ``bpd = -log p_y / (D ln 2) = -log p_x / (D ln 2) + log2(num_bins / data_range)``,

``+ 7`` for 256 levels on ``[-1, 1]``: score_sde's ``offset = 7 - inverse_scaler(-1)``.
A density uniform over ``[-1, 1]^D`` (``log p_x = -D log 2``) gives exactly 8 bits.

:func:`encode` and :func:`decode` are the deterministic maps ``x_{t_min} <-> x_T`` of
the same ODE solve (DDIM inversion done with an adaptive solver).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from difflax.checks import check_choice, check_positive_int
from difflax.solvers.adaptive import check_method, flow_coordinates, pf_ode, solve_ode, time_from_r
from difflax.solvers.base import call

Array = jax.Array

__all__ = ["bits_per_dim", "decode", "dequantize", "encode", "log_likelihood"]

_DIVERGENCES = ("exact", "hutchinson")
_NOISES = ("rademacher", "gaussian")


def _event_sum(a):
    return jnp.sum(a, axis=tuple(range(1, a.ndim)))


def _times(process, t_min, t_max, dtype):
    t_min = process.t_min if t_min is None else t_min
    t_max = process.t_max if t_max is None else t_max
    return jnp.asarray(t_min, dtype), jnp.asarray(t_max, dtype)


def _check_x(x):
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x must have a batch axis and at least one event axis, shape (batch, ...); got {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating-point array; got dtype {x.dtype}.")
    return x


def log_likelihood(
    denoise: Callable,
    process,
    x: Array,
    *,
    key: Array | None = None,
    divergence: str = "exact",
    probes: int = 1,
    noise: str = "rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t_min: float | None = None,
    t_max: float | None = None,
    method: str = "tsit5",
    max_steps: int = 4096,
    prior_logp: Callable | None = None,
    throw: bool = True,
):
    """Log-density of ``x`` under the model's marginal at ``t_min``, via the probability-flow ODE.

    Args:
      denoise: the denoiser ``denoise(x_t, t) -> x0_hat`` (examples must not interact).
      process: its forward process.
      x: data, shape ``(batch, ...)``.
      key: PRNG key for the Hutchinson probes (required for ``divergence="hutchinson"``).
      divergence: ``"exact"`` (``D`` JVPs per evaluation) or ``"hutchinson"``.
      probes: number of Hutchinson probes averaged at every evaluation (static).
      noise: ``"rademacher"`` or ``"gaussian"`` probes.
      rtol, atol: tolerances of the adaptive solver (traced).
      t_min: start time, the ``eps`` of Song et al. (default ``process.t_min``).
      t_max: end time (default ``process.t_max``).
      method: ``"tsit5"`` or ``"dopri5"``.
      max_steps: diffrax's step budget (static).
      prior_logp: ``prior_logp(x_T) -> (batch,)``; default ``N(0, sigma(t_max)^2 I)``.
      throw: raise if the solve fails; else see ``info["success"]``.

    Returns:
      ``(logp, info)``: ``logp`` of shape ``(batch,)`` in nats; ``info`` has ``prior_logp``,
      ``delta_logp`` (the integral plus the coordinate change), ``x_T``, ``nfe``
      (vector-field evaluations, each one denoiser call plus its JVPs), ``steps``,
      ``rejected_steps``, ``success``.
    """
    x = _check_x(x)
    check_method(method)
    check_choice(divergence, _DIVERGENCES, "divergence")
    check_choice(noise, _NOISES, "noise")
    check_positive_int(probes, "probes")
    if divergence == "hutchinson" and key is None:
        raise ValueError("divergence='hutchinson' draws random probes; pass key=jax.random.key(...).")

    dtype = x.dtype
    batch, dim = x.shape[0], math.prod(x.shape[1:])
    t0, t1 = _times(process, t_min, t_max, dtype)
    r0, c0 = flow_coordinates(process, t0)
    r1, c1 = flow_coordinates(process, t1)

    if divergence == "hutchinson":
        shape = (probes, *x.shape)
        if noise == "rademacher":
            eps = jax.random.rademacher(key, shape, dtype)
        else:
            eps = jax.random.normal(key, shape, dtype)

    def vector_field(r, state):
        z, _ = state
        t = time_from_r(process, r)
        _, c = flow_coordinates(process, t)

        def velocity(z):
            return (z - call(denoise, c * z, t)) / r

        if divergence == "exact":
            basis = jnp.eye(dim, dtype=dtype).reshape((dim, 1, *x.shape[1:]))
            basis = jnp.broadcast_to(basis, (dim, *x.shape))
            # The Jacobian is block-diagonal over the batch: one basis vector per example at a time.
            dz, jac_cols = jax.vmap(lambda v: jax.jvp(velocity, (z,), (v,)), out_axes=(None, 0))(basis)
            div = jnp.einsum("jbd,jbd->b", jac_cols.reshape(dim, batch, dim), basis.reshape(dim, batch, dim))
        else:
            dz, jv = jax.vmap(lambda v: jax.jvp(velocity, (z,), (v,)), out_axes=(None, 0))(eps)
            div = jnp.mean(jax.vmap(_event_sum)(eps * jv), axis=0)
        return dz, div

    state0 = (x / c0, jnp.zeros((batch,), dtype))
    (z1, integral), info = solve_ode(
        vector_field, state0, r0, r1, rtol=rtol, atol=atol, method=method, max_steps=max_steps, throw=throw
    )
    x_T = c1 * z1
    if prior_logp is None:
        sigma_T = process.sigma(t1)
        prior = -0.5 * _event_sum(x_T**2) / sigma_T**2 - dim * (jnp.log(sigma_T) + 0.5 * math.log(2 * math.pi))
    else:
        prior = jnp.asarray(prior_logp(x_T))
        if prior.shape != (batch,):
            raise ValueError(f"prior_logp must return shape ({batch},); got {prior.shape}.")
    delta = integral + dim * (jnp.log(c1) - jnp.log(c0))
    info = {**info, "prior_logp": prior, "delta_logp": delta, "x_T": x_T}
    return prior + delta, info


def bits_per_dim(logp, dim: int, num_bins: int = 256, data_range: float = 2.0):
    """Bits per dimension of a log-density ``logp`` (nats, per example) of ``dim``-dimensional data.

    ``bpd = -logp / (dim ln 2) + log2(num_bins / data_range)``: the density of data in a
    range of width ``data_range`` (``[-1, 1]``) expressed in units of the ``num_bins``
    integer levels (see the module docstring; Song et al. 2021's ``offset = 7`` for
    8-bit data on ``[-1, 1]``). ``logp`` should be the density of uniformly
    dequantized data (:func:`dequantize`), which lower-bounds the discrete likelihood.
    """
    check_positive_int(dim, "dim (values per example)")
    if num_bins < 2 or data_range <= 0:
        raise ValueError(f"need num_bins >= 2 and data_range > 0; got {num_bins!r}, {data_range!r}.")
    return -jnp.asarray(logp) / (dim * math.log(2.0)) + math.log2(num_bins / data_range)


def dequantize(key: Array, x: Array, num_bins: int = 256, low: float = -1.0, high: float = 1.0) -> Array:
    """Uniform dequantization of data quantized to ``num_bins`` levels and scaled to ``[low, high]``.

    Level ``k`` (``x = low + k (high - low) / (num_bins - 1)``, e.g. ``2 k / 255 - 1``)
    becomes ``low + (k + u) (high - low) / num_bins`` with ``u ~ U[0, 1)``: score_sde's
    ``(255 x01 + u) / 256`` rescaled, so the bins tile ``[low, high)`` exactly.
    """
    x = jnp.asarray(x)
    width = high - low
    k = jnp.round((x - low) / width * (num_bins - 1))
    u = jax.random.uniform(key, x.shape, x.dtype)
    return low + (k + u) * (width / num_bins)


def encode(
    denoise: Callable,
    process,
    x0: Array,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t_min: float | None = None,
    t_max: float | None = None,
    method: str = "tsit5",
    max_steps: int = 4096,
) -> Array:
    """Map data ``x0`` (taken as ``x_{t_min}``) to its latent ``x_T`` along the probability-flow ODE."""
    x0 = _check_x(x0)
    t0, t1 = _times(process, t_min, t_max, x0.dtype)
    x_T, _ = pf_ode(denoise, process, x0, t0, t1, rtol=rtol, atol=atol, method=method, max_steps=max_steps)
    return x_T


def decode(
    denoise: Callable,
    process,
    x_T: Array,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t_min: float | None = None,
    t_max: float | None = None,
    method: str = "tsit5",
    max_steps: int = 4096,
) -> Array:
    """Map a latent ``x_T`` back to ``x_{t_min}``: the inverse of :func:`encode` (up to the tolerances)."""
    x_T = _check_x(x_T)
    t0, t1 = _times(process, t_min, t_max, x_T.dtype)
    x0, _ = pf_ode(denoise, process, x_T, t1, t0, rtol=rtol, atol=atol, method=method, max_steps=max_steps)
    return x0
