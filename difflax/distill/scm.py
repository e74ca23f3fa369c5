"""Continuous-time consistency models with TrigFlow: sCM (Lu & Song 2024, "Simplifying, stabilizing and scaling
continuous-time consistency models").

TrigFlow (section 2): ``x_t = cos(t) x0 + sin(t) z`` with ``z ~ N(0, sigma_d^2 I)``, ``t`` in ``[0, pi/2]``; the
probability-flow ODE is ``dx_t/dt = sigma_d F(x_t / sigma_d, t)`` and the consistency model is

    ``f(x_t, t) = cos(t) x_t - sin(t) sigma_d F_theta(x_t / sigma_d, t)``.

TrigFlow is the EDM process read at noise level ``sigma = sigma_d tan(t)`` (``x_edm = x_t / cos(t)``), and an
EDM-preconditioned network is a TrigFlow network: with ``c_in x_edm = x_t / sigma_d``, ``c_skip = cos^2 t`` and
``c_out = sigma_d sin t``, EDM's ``D = cos(t) x_t + sigma_d sin(t) F_edm``, so ``F = -F_edm`` at
``c_noise = ln(sigma_d tan t) / 4`` (:func:`edm_as_trigflow`) and ``f`` is the EDM denoiser.

The continuous-time consistency gradient (eq. 8 and the stop-gradient form of section 4) is that of

    ``e^{w(t)} / D |F_theta - F_theta- - g|^2 - w(t)``,
    ``g = -cos^2(t) (sigma_d F_theta- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF_theta-/dt)``,

with ``theta- = stop_gradient(theta)``, ``g = cos(t) df_theta-/dt`` at ``r = 1``, ``dF/dt`` one JVP of the
network along ``(dx_t/dt / sigma_d, 1)``, the tangent warm-up ``r`` rising from 0 to 1, tangent normalization
``g / (|g| + c)`` and a learned adaptive weight ``w(t)``. ``dx_t/dt`` is ``cos(t) z - sin(t) x0`` (training,
sCT) or the teacher's ODE (distillation, sCD).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from difflax.processes import broadcast_to

__all__ = [
    "edm_as_trigflow",
    "sample_trigflow_time",
    "scm_loss",
    "scm_tangent",
    "trigflow_denoiser",
    "trigflow_time",
    "trigflow_velocity",
]


def trigflow_time(sigma, sigma_data: float):
    """TrigFlow time ``t = arctan(sigma / sigma_d)`` of the noise level ``sigma`` (``sigma / alpha`` of any process)."""
    return jnp.arctan(jnp.asarray(sigma) / sigma_data)


def edm_as_trigflow(apply_fn, sigma_data: float):
    """The TrigFlow network ``F(x_t / sigma_d, t) = -F_edm(x_t / sigma_d, ln(sigma_d tan t) / 4)`` of an
    EDM-preconditioned network ``apply_fn(c_in x, c_noise)``."""

    def F(x_scaled, t):
        return -apply_fn(x_scaled, 0.25 * jnp.log(sigma_data * jnp.tan(t)))

    return F


def trigflow_denoiser(denoise, process, sigma_data: float):
    """``denoise`` (a denoiser of ``process``) read at TrigFlow points: ``D(x_t, t) = denoise(alpha(s) x_t / cos t, s)``
    at the process time ``s`` of noise level ``sigma_d tan t`` (every process has the same ODE in these units)."""

    def D(x_t, t):
        s = process.t_from_log_snr(-2.0 * jnp.log(sigma_data * jnp.tan(t)))
        return denoise(broadcast_to(process.alpha(s) / jnp.cos(t), x_t) * x_t, s)

    return D


def trigflow_velocity(denoise_trig):
    """The TrigFlow ODE ``dx_t/dt = (cos(t) x_t - D(x_t, t)) / sin(t)`` of a TrigFlow denoiser (``t > 0``)."""

    def v(x_t, t):
        return (broadcast_to(jnp.cos(t), x_t) * x_t - denoise_trig(x_t, t)) / broadcast_to(jnp.sin(t), x_t)

    return v


def sample_trigflow_time(
    key,
    shape,
    sigma_data: float,
    *,
    p_mean: float = -1.0,
    p_std: float = 1.4,
    t_min: float = 0.0,
    t_max: float = jnp.pi / 2,
):
    """``t = arctan(e^tau / sigma_d)`` with ``tau ~ N(P_mean, P_std^2)`` (Lu & Song 2024, section 5), clipped to
    ``[t_min, t_max]``."""
    tau = p_mean + p_std * jax.random.normal(key, shape)
    return jnp.clip(jnp.arctan(jnp.exp(tau) / sigma_data), t_min, t_max)


def scm_tangent(F, x_t, t, dxdt, sigma_data: float, warmup=1.0):
    """``(F_theta(x_t / sigma_d, t), g)`` with the (unnormalized) tangent ``g`` of the module docstring.

    ``g`` is a stop-gradient; the first output is the differentiable primal of the same JVP.
    """
    sd = sigma_data
    value, dFdt = jax.jvp(F, (x_t / sd, t), (dxdt / sd, jnp.ones_like(t)))
    cos, sin = broadcast_to(jnp.cos(t), x_t), broadcast_to(jnp.sin(t), x_t)
    F_minus = jax.lax.stop_gradient(value)
    g = -(cos**2) * (sd * F_minus - dxdt) - warmup * cos * sin * (x_t + sd * jax.lax.stop_gradient(dFdt))
    return value, jax.lax.stop_gradient(g)


def scm_loss(
    F,
    x0,
    key,
    *,
    sigma_data: float,
    teacher_velocity=None,
    warmup=1.0,
    log_weight=None,
    tangent_c: float = 0.1,
    p_mean: float = -1.0,
    p_std: float = 1.4,
    t_min: float = 0.0,
    t_max: float = jnp.pi / 2,
):
    """Per-example sCM loss ``e^{w(t)} / D |F_theta - stop_gradient(F_theta - g / (|g| + c))|^2 - w(t)``.

    Args:
      F: the TrigFlow network being trained, ``F(x_t / sigma_d, t)``.
      x0: data batch.
      key: PRNG key.
      sigma_data: ``sigma_d``.
      teacher_velocity: ``dx_t/dt (x_t, t)`` of a frozen teacher (sCD, e.g. :func:`trigflow_velocity`);
        ``None`` trains from scratch (sCT) with ``cos(t) z - sin(t) x0``.
      warmup: the tangent warm-up factor ``r`` in ``[0, 1]`` (may be traced).
      log_weight: the adaptive weighting ``w(t)`` (a callable of ``t``, trained with the loss), or ``None`` (0).
      tangent_c: ``c`` of the tangent normalization (0 turns it off).
      p_mean, p_std, t_min, t_max: the time distribution of :func:`sample_trigflow_time`.
    """
    k_t, k_z = jax.random.split(key)
    batch = x0.shape[0]
    t = sample_trigflow_time(k_t, (batch,), sigma_data, p_mean=p_mean, p_std=p_std, t_min=t_min, t_max=t_max)
    z = sigma_data * jax.random.normal(k_z, x0.shape, x0.dtype)
    cos, sin = broadcast_to(jnp.cos(t), x0), broadcast_to(jnp.sin(t), x0)
    x_t = cos * x0 + sin * z
    dxdt = cos * z - sin * x0 if teacher_velocity is None else jax.lax.stop_gradient(teacher_velocity(x_t, t))
    value, g = scm_tangent(F, x_t, t, dxdt, sigma_data, warmup)
    g = g.reshape(batch, -1)
    if tangent_c > 0:
        g = g / (jnp.linalg.norm(g, axis=1, keepdims=True) + tangent_c)
    value = value.reshape(batch, -1)
    sq_error = jnp.mean((value - jax.lax.stop_gradient(value) - g) ** 2, axis=1)
    w = jnp.zeros_like(t) if log_weight is None else log_weight(t)
    return jnp.exp(w) * sq_error - w
