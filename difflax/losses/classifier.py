"""The training loss of a noise-conditional classifier, for classifier guidance.

Dhariwal & Nichol 2021 (sec. 4) train a classifier ``p_phi(y | x_t, t)`` on the noisy
marginals ``x_t = alpha(t) x0 + sigma(t) eps`` of the diffusion process, so that its
gradient approximates ``grad_{x_t} log p(y | x_t)`` at every ``t``; guidance with it is
:func:`difflax.guidance.classifier_guidance`.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

from difflax.processes import Process

Array = chex.Array

__all__ = ["noisy_classifier_loss"]


def noisy_classifier_loss(logits_fn: Callable, process: Process, x0, y, t, eps) -> Array:
    """Cross-entropy of a noise-conditional classifier on ``x_t = alpha(t) x0 + sigma(t) eps``.

    ``logits_fn(x_t, t) -> (batch, classes)``; ``y`` holds integer labels ``(batch,)`` or
    class probabilities ``(batch, classes)``. Returns one value per example,
    ``-sum_c y_c log softmax(logits)_c``; draw ``t`` and ``eps`` as for the denoising loss.
    """
    x_t = process.marginal(x0, t, eps)
    logp = jax.nn.log_softmax(logits_fn(x_t, t), axis=-1)
    y = jnp.asarray(y)
    if y.ndim == logp.ndim:
        return -jnp.sum(y * logp, axis=-1)
    if y.shape != logp.shape[:1]:
        raise ValueError(f"y must hold integer labels of shape {logp.shape[:1]} or probabilities {logp.shape}; "
                         f"got shape {y.shape}.")
    return -jnp.take_along_axis(logp, y.astype(jnp.int32)[:, None], axis=-1)[:, 0]
