"""Shortcut models (Frans et al. 2024, "One Step Diffusion via Shortcut Models").

A shortcut ``s(x_t, t, d)`` is the step of size ``d`` along the flow, ``x_{t-d} = x_t - d s(x_t, t, d)``
(here ``t = 1`` is noise, as everywhere in difflax); it is the average velocity of
:mod:`difflax.distill.meanflow` over ``[t - d, t]``, so the student is the same callable
``u(x, r, t)`` with ``s(x, t, d) = u(x, t - d, t)`` and samples with
:func:`~difflax.distill.meanflow.average_velocity_sample`. Training (section 3, eq. 5) combines

* flow matching at ``d = 0``: ``|s(x_t, t, 0) - v|^2`` with ``v = z - x0`` (or a teacher's velocity), and
* self-consistency: ``s(x_t, t, 2d) = (s(x_t, t, d) + s(x'_{t-d}, t - d, d)) / 2`` with
  ``x'_{t-d} = x_t - d s(x_t, t, d)``, regressed onto its stop-gradient right-hand side,

on a fraction of the batch (a quarter in the paper), with ``d`` one of ``t_max / 2^k``, ``k = 1..K``, and
``t`` on the grid of multiples of ``d`` down from ``t_max`` with ``t - 2d >= 0``: the grids that ``2^k``-step
sampling from ``t_max`` to 0 visits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from difflax.processes import broadcast_to

__all__ = ["shortcut_loss"]


def _sq_norm(x):
    return jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=1)


def shortcut_loss(
    u,
    x0,
    key,
    *,
    teacher_velocity=None,
    consistency_fraction: float = 0.25,
    num_levels: int = 7,
    t_min: float = 0.0,
    t_max: float = 1.0,
):
    """Per-example shortcut loss: flow matching (``d = 0``) on the first examples, self-consistency on the last
    ``round(consistency_fraction * batch)``.

    Args:
      u: the student, ``u(x, r, t)``: the shortcut of size ``d = t - r`` at ``t``.
      x0: data batch.
      key: PRNG key.
      teacher_velocity: ``v(x_t, t)`` of a frozen teacher flow (distillation); ``None`` trains from scratch.
      consistency_fraction: share of the batch trained for self-consistency.
      num_levels: ``K``: step sizes ``d = t_max / 2^k``, ``k = 1..K`` (the smallest shortcut
        ``2d`` is ``2^(K-1)`` times finer than one step).
      t_min, t_max: flow matching draws ``t`` uniformly in ``[t_min, t_max]``; sampling starts at ``t_max``.
    """
    if not 0.0 <= consistency_fraction <= 1.0:
        raise ValueError(f"consistency_fraction must lie in [0, 1]; got {consistency_fraction}.")
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1; got {num_levels}.")
    batch = x0.shape[0]
    n_sc = round(consistency_fraction * batch)
    k_t, k_z, k_d, k_j = jax.random.split(key, 4)
    d = t_max / 2.0 ** jax.random.randint(k_d, (batch,), 1, num_levels + 1).astype(x0.dtype)
    j = jnp.floor(jax.random.uniform(k_j, (batch,), x0.dtype) * (t_max / d - 1.0))  # t - 2d >= 0
    t_sc = t_max - j * d
    t_fm = t_min + (t_max - t_min) * jax.random.uniform(k_t, (batch,), x0.dtype)
    is_sc = jnp.arange(batch) >= batch - n_sc
    t = jnp.where(is_sc, t_sc, t_fm)
    d = jnp.where(is_sc, d, 0.0)
    z = jax.random.normal(k_z, x0.shape, x0.dtype)
    x_t = broadcast_to(1.0 - t, x0) * x0 + broadcast_to(t, x0) * z
    # every call sees the whole batch (a student may close over per-example labels)
    v = z - x0 if teacher_velocity is None else teacher_velocity(x_t, t)
    s1 = u(x_t, t - d, t)
    s2 = u(x_t - broadcast_to(d, x_t) * s1, t - 2.0 * d, t - d)
    target = jax.lax.stop_gradient(jnp.where(broadcast_to(is_sc, x_t), 0.5 * (s1 + s2), v))
    return _sq_norm(u(x_t, t - 2.0 * d, t) - target)
