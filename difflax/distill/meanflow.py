"""MeanFlow: one-step generation with the average velocity (Geng et al. 2025, "Mean Flows for One-step
Generative Modeling").

On the linear interpolant ``x_t = (1 - t) x0 + t z`` of flow matching (``t = 1`` is noise) the
average velocity over ``[r, t]`` is

    ``u(x_t, r, t) = 1 / (t - r) int_r^t v(x_s, s) ds``,

so one step ``x_r = x_t - (t - r) u(x_t, r, t)`` lands exactly on the ODE trajectory and
``u(x, t, t) = v(x, t)``. Differentiating ``(t - r) u = int_r^t v`` in ``t`` gives the MeanFlow
identity (eq. 6)

    ``u(x_t, r, t) = v(x_t, t) - (t - r) d/dt u(x_t, r, t)``,

whose total derivative along the ODE, ``d/dt u = v d_x u + d_t u``, is one forward-mode product
(``jax.jvp``) of ``u`` along the tangent ``(v, 0, 1)`` in ``(x, r, t)``. The loss regresses ``u``
onto the stop-gradient right-hand side, with ``v`` the conditional velocity ``z - x0`` (training
from scratch) or a teacher's velocity (distillation), weighted adaptively by
``stop_gradient(1 / (|Delta|^2 + c)^p)`` (eq. 9 - 10). Every function here takes the average
velocity as a callable ``u(x, r, t)`` (``r``, ``t`` per example, shape ``(batch,)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from difflax.processes import broadcast_to

__all__ = [
    "adaptive_weight",
    "average_velocity_sample",
    "meanflow_loss",
    "meanflow_target",
    "sample_interval",
]


def sample_interval(
    key, shape, *, ratio: float = 0.25, p_mean: float = -0.4, p_std: float = 1.0, t_min: float = 0.0, t_max: float = 1.0
):
    """Times ``(r, t)``, ``r <= t``: two logit-normal draws sorted, scaled to ``[0, t_max]`` with
    ``t >= t_min``; a fraction ``1 - ratio`` of the examples gets ``r = t`` (plain flow matching).

    Geng et al. 2025 (table 1a) find 25% of ``r != t`` best, with ``lognorm(-0.4, 1.0)``.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must lie in [0, 1]; got {ratio}.")
    k_a, k_b, k_m = jax.random.split(key, 3)
    a = jax.nn.sigmoid(p_mean + p_std * jax.random.normal(k_a, shape))
    b = jax.nn.sigmoid(p_mean + p_std * jax.random.normal(k_b, shape))
    t = jnp.maximum(t_max * jnp.maximum(a, b), t_min)
    r = jnp.where(jax.random.uniform(k_m, shape) < ratio, t_max * jnp.minimum(a, b), t)
    return jnp.minimum(r, t), t


def meanflow_target(u, x_t, r, t, v):
    """``(u(x_t, r, t), stop_gradient(v - (t - r) du/dt))`` with ``du/dt`` the JVP of ``u`` along ``(v, 0, 1)``.

    The first output is differentiable (it is the primal output of the same JVP), the second is the
    regression target of the MeanFlow identity (Geng et al. 2025, eq. 8).
    """
    value, dudt = jax.jvp(u, (x_t, r, t), (v, jnp.zeros_like(r), jnp.ones_like(t)))
    return value, jax.lax.stop_gradient(v - broadcast_to(t - r, x_t) * dudt)


def adaptive_weight(sq_error, power: float = 1.0, c: float = 1e-3):
    """``stop_gradient(1 / (sq_error + c)^power)``: ``power = 0`` is the squared L2 loss, ``0.5`` a pseudo-Huber
    loss, ``1`` (the paper's best) close to a log loss (Geng et al. 2025, eq. 10)."""
    return jax.lax.stop_gradient(1.0 / (sq_error + c) ** power)


def meanflow_loss(
    u,
    x0,
    key,
    *,
    teacher_velocity=None,
    ratio: float = 0.25,
    p_mean: float = -0.4,
    p_std: float = 1.0,
    power: float = 1.0,
    c: float = 1e-3,
    t_min: float = 0.0,
    t_max: float = 1.0,
):
    """Per-example MeanFlow loss ``w |u(x_t, r, t) - stop_gradient(v - (t - r) du/dt)|^2``.

    Args:
      u: the average velocity being trained, ``u(x, r, t)``.
      x0: data batch.
      key: PRNG key (times and noise).
      teacher_velocity: ``v(x_t, t)`` of a frozen teacher flow (distillation); ``None`` trains from
        scratch with the conditional velocity ``z - x0``.
      ratio, p_mean, p_std, t_min, t_max: the time distribution of :func:`sample_interval`.
      power, c: the adaptive weighting of :func:`adaptive_weight`.
    """
    k_t, k_z = jax.random.split(key)
    r, t = sample_interval(k_t, (x0.shape[0],), ratio=ratio, p_mean=p_mean, p_std=p_std, t_min=t_min, t_max=t_max)
    z = jax.random.normal(k_z, x0.shape, x0.dtype)
    x_t = broadcast_to(1.0 - t, x0) * x0 + broadcast_to(t, x0) * z
    v = z - x0 if teacher_velocity is None else jax.lax.stop_gradient(teacher_velocity(x_t, t))
    value, target = meanflow_target(u, x_t, r, t, v)
    sq_error = jnp.sum((value - target).reshape(x0.shape[0], -1) ** 2, axis=1)
    return adaptive_weight(sq_error, power, c) * sq_error


def average_velocity_sample(u, x_T, ts):
    """Few-step sampling ``x_r = x_t - (t - r) u(x_t, r, t)`` over the decreasing times ``ts``.

    ``ts = [1, 0]`` is one-step generation; one evaluation of ``u`` per step. Returns
    ``(x, info)`` with ``info["nfe"]``.
    """
    ts = jnp.asarray(ts)
    batch = x_T.shape[0]

    def body(x, times):
        t, r = (jnp.full((batch,), s, x.dtype) for s in times)
        return x - broadcast_to(t - r, x) * u(x, r, t), None

    x, _ = jax.lax.scan(body, x_T, (ts[:-1], ts[1:]))
    return x, {"nfe": ts.shape[0] - 1}
