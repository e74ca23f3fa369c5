"""Guidance distillation (Meng et al. 2023, "On distillation of guided diffusion models", stage one).

Classifier-free guidance costs two network calls per step. A student ``x_eta(z_t, t, w)``
conditioned on the guidance strength ``w`` learns the guided prediction

    x_hat_w = (1 + w) x_c(z_t) - w x_u(z_t)

of the frozen teacher for ``w ~ U[w_min, w_max]``, so guided sampling at any ``w`` in the
range costs one call per step. The loss is the ``x0`` error with a weighting of
:func:`difflax.losses.loss_weight`. (Stage two of the paper progressively distills this
student with :func:`difflax.distill.progressive_loss`, whose teacher is the student at a
fixed ``w``.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from difflax.guidance import cfg
from difflax.losses import loss_weight

__all__ = ["guidance_distillation_loss"]


def guidance_distillation_loss(
    student, teacher, y, process, x0, t, key, *, null, w_range=(0.0, 4.0), weighting: str = "snr+1"
):
    """Per-example loss ``weight(t) mean((student(z_t, t, w) - x_hat_w)^2)``.

    Args:
      student: ``student(z_t, t, w) -> x0_hat`` with ``w`` of shape ``(batch,)``.
      teacher: the frozen teacher's conditional denoiser ``(z_t, t, y) -> x0_hat``; the target
        is :func:`difflax.guidance.cfg` of it with ``convention="w"`` (one batched call).
      y: the batch's conditions; ``null``: the null condition (as for ``cfg``).
      process: the forward process.
      x0: data batch; ``t``: ``(batch,)`` noise levels.
      key: PRNG key for ``w`` and the noise.
      w_range: ``(w_min, w_max)``; ``w`` is drawn uniformly (``w = 0`` is the conditional model).
      weighting: a weighting name of :func:`difflax.losses.loss_weight` on the ``x0`` error.
    """
    k_w, k_eps = jax.random.split(key)
    batch = x0.shape[0]
    w = jax.random.uniform(k_w, (batch,), x0.dtype, w_range[0], w_range[1])
    z = process.marginal(x0, t, jax.random.normal(k_eps, x0.shape, x0.dtype))
    target = jax.lax.stop_gradient(cfg(teacher, y, w, null=null, convention="w")(z, t))
    err = jnp.mean(jnp.square(student(z, t, w) - target).reshape(batch, -1), axis=1)
    return loss_weight(process, t, prediction="x0", weighting=weighting) * err
