"""Denoiser transforms that constrain the x0 prediction: to a range, or to known values.

* :func:`clip_x0` (static thresholding, Ho et al. 2020) and :func:`dynamic_threshold`
  (Saharia et al. 2022) keep ``x0_hat`` in the data range;
* :func:`inpaint` sets ``x0_hat`` to the known values on a mask, ``D' = m known + (1 - m) D``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from difflax.checks import concrete_float
from difflax.parametrization import Denoiser
from difflax.processes import broadcast_to

Array = jax.Array

__all__ = ["clip_x0", "dynamic_threshold", "inpaint"]


def dynamic_threshold(denoise: Denoiser, percentile=0.995, *, max_value=1.0) -> Denoiser:
    """Dynamic thresholding of x0 predictions (Saharia et al. 2022, "Imagen", sec. 2.3).

    Per example, ``s = max(quantile(|x0_hat|, percentile), max_value)`` over all non-batch
    axes; ``x0_hat`` is clipped to ``[-s, s]`` and scaled by ``max_value / s``, so the
    output lies in ``[-max_value, max_value]`` (Imagen: ``percentile = 0.995`` i.e. the
    99.5th percentile, ``max_value = 1`` for data in ``[-1, 1]``). Predictions already in
    range are returned unchanged (``s = max_value``).
    """
    p = concrete_float(percentile)
    if p is not None and not 0.0 < p <= 1.0:
        raise ValueError(f"percentile must be a fraction in (0, 1] (e.g. 0.995); got {percentile!r}.")

    def thresholded(x, t):
        x0 = denoise(x, t)
        flat = jnp.abs(x0).reshape(x0.shape[0], -1)
        s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), max_value)
        s = broadcast_to(s, x0)
        return jnp.clip(x0, -s, s) * (max_value / s)

    return thresholded


def clip_x0(denoise: Denoiser, lo=-1.0, hi=1.0) -> Denoiser:
    """Static thresholding: clip x0 predictions to ``[lo, hi]`` (Ho et al. 2020's ``clip_denoised``)."""
    return lambda x, t: jnp.clip(denoise(x, t), lo, hi)


def _broadcasts_to(shape: tuple, target: tuple) -> bool:
    try:
        return np.broadcast_shapes(shape, target) == target
    except ValueError:
        return False


def prepare_mask(mask, x_shape, *, known=None) -> Array:
    """``mask`` (true or nonzero where known) as a boolean array of shape ``x_shape``.

    Raises a ``ValueError`` if ``mask``, or the ``known`` values when given, do not
    broadcast to ``x_shape``.
    """
    x_shape = tuple(x_shape)
    mask = jnp.asarray(mask)
    for name, value in (("mask", mask), ("known", known)):
        if value is not None and not _broadcasts_to(jnp.shape(value), x_shape):
            raise ValueError(
                f"{name} has shape {jnp.shape(value)}, which does not broadcast to the data shape {x_shape}."
            )
    return jnp.broadcast_to(mask if mask.dtype == jnp.bool_ else mask != 0, x_shape)


def inpaint(denoise: Denoiser, known, mask) -> Denoiser:
    """Replace the prediction on the mask by the known values: ``D' = m known + (1 - m) D``.

    A denoiser transform, so it works with every solver; ``mask`` (true / 1 where known) and
    ``known`` broadcast to ``x_t``'s shape. Unlike replacement sampling (Song et al. 2021,
    app. I; Lugmayr et al. 2022, "RePaint"), which resets the known coordinates of ``x_t``
    to a fresh draw of ``q(x_t | known)`` after every step and so acts between steps, here
    the known coordinates move wherever the solver's update takes them given
    ``x0_hat = known`` there (for DDIM with ``eta = 0`` they stay on
    ``alpha_t known + sigma_t z`` with the ``z`` implied by ``x_T``; stochastic solvers add
    their own noise), and only the final denoising step makes them exactly ``known``. The
    unknown part sees the known one through the denoiser's input in both.
    """

    def inpainted(x, t):
        m = prepare_mask(mask, x.shape, known=known)
        return jnp.where(m, jnp.asarray(known, x.dtype), denoise(x, t))

    return inpainted
