"""Progressive distillation (Salimans & Ho 2022, "Progressive distillation for fast sampling").

A student that takes ``N`` DDIM steps learns to match ``2N`` steps of its teacher: on the
teacher's grid ``t_0 > t_1 > ... > t_{2N}`` the student's step from ``t = t_{2i}`` to
``t'' = t_{2i+2}`` must land where two teacher DDIM steps (through ``t' = t_{2i+1}``) land.
DDIM from ``t`` to ``s`` with prediction ``x_hat`` is
``z_s = alpha_s x_hat + (sigma_s / sigma_t) (z_t - alpha_t x_hat)``, so the student's
``x0`` target that reproduces the teacher's two steps is (Salimans & Ho, alg. 2)::

    x_tilde = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)

and the loss is ``w(lambda_t) ||x_tilde - x_student(z_t)||^2`` with the truncated-SNR weight
``w = max(SNR, 1)`` (the paper's choice; it stays finite at ``alpha = 0`` where the eps
weight does not). The student is initialized from the teacher and becomes the next round's
teacher, halving the step count each round.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from difflax.losses import loss_weight
from difflax.processes import broadcast_to
from difflax.transitions import coefficients, ddim_step, eps_from_x0

__all__ = ["progressive_loss", "progressive_target", "student_grid"]


def _ddim(process, z, t, s, x0_hat):
    """Deterministic DDIM from ``t`` to ``s`` (per-example times): ``alpha_s x0 + sigma_s eps_t``."""
    return ddim_step(x0_hat, eps_from_x0(z, x0_hat, coefficients(process, t, like=z)), coefficients(process, s, like=z))


def progressive_target(teacher, process, z, t, t_mid, t_next):
    """The ``x0`` target of the student's step ``t -> t_next`` from two teacher DDIM steps via ``t_mid``.

    ``t``, ``t_mid`` and ``t_next`` are per-example ``(batch,)``; ``t_next`` may be exactly 0
    (``sigma = 0``), where the target is the teacher's second prediction.
    """
    z_mid = _ddim(process, z, t, t_mid, teacher(z, t))
    z_next = _ddim(process, z_mid, t_mid, t_next, teacher(z_mid, t_mid))
    a_t, s_t = process.alpha_sigma(t)
    a_n, s_n = process.alpha_sigma(t_next)
    ratio = s_n / s_t
    return (z_next - broadcast_to(ratio, z) * z) / broadcast_to(a_n - ratio * a_t, z)


def student_grid(teacher_ts):
    """The student's grid: every other time of the teacher's (which must have an even number of steps)."""
    steps = teacher_ts.shape[0] - 1
    if steps % 2:
        raise ValueError(f"teacher_ts must have an even number of steps; got {steps}.")
    return teacher_ts[::2]


def progressive_loss(student, teacher, process, x0, key, teacher_ts, *, weighting: str = "truncated_snr"):
    """Per-example progressive distillation loss on the teacher's grid ``teacher_ts`` (``2N + 1`` times).

    Args:
      student: the student denoiser ``(z_t, t) -> x0_hat`` being trained.
      teacher: the frozen teacher denoiser (gradients are stopped).
      process: the forward process of both.
      x0: a data batch.
      key: PRNG key for the step index and the noise.
      teacher_ts: decreasing teacher times ``t_0 > ... > t_{2N}`` (may end in an exact 0).
      weighting: ``"truncated_snr"`` (``max(SNR, 1)``, the paper's) or any weighting of
        :func:`difflax.losses.loss_weight`, applied to the ``x0`` error.

    Returns:
      ``(batch,)`` losses ``w(t) * mean((x_tilde - student(z_t, t))^2)``.
    """
    steps = student_grid(teacher_ts).shape[0] - 1  # checks that the teacher's steps pair up
    k_i, k_eps = jax.random.split(key)
    batch = x0.shape[0]
    i = 2 * jax.random.randint(k_i, (batch,), 0, steps)
    t, t_mid, t_next = teacher_ts[i], teacher_ts[i + 1], teacher_ts[i + 2]
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    z = process.marginal(x0, t, eps)
    target = jax.lax.stop_gradient(progressive_target(teacher, process, z, t, t_mid, t_next))
    if weighting == "truncated_snr":
        weight = jnp.maximum(jnp.exp(process.log_snr(t)), 1.0)
    else:
        weight = loss_weight(process, t, prediction="x0", weighting=weighting)
    err = jnp.mean(jnp.square(student(z, t) - target).reshape(batch, -1), axis=1)
    return weight * err
