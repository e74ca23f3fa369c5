"""Preconditioning wrapper: any network of :mod:`difflax.models` as the denoiser of any process.

The conversions are those of :func:`difflax.as_denoiser` (one module holds them all);
this wrapper only makes them a Flax module, so the parameters of the wrapped network
train through the denoiser output ``x0_hat``.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from difflax.parametrization import PREDICTIONS, as_denoiser, check_prediction
from difflax.processes import Process

Array = jax.Array

__all__ = ["Preconditioned"]


class Preconditioned(nn.Module):
    """``Preconditioned(net, process, prediction)(x_t, t, y=None, *, train=False, self_cond=None) -> x0_hat``.

    ``prediction`` names what ``net`` outputs:

    * ``"edm"``: ``net`` is the raw ``F`` of Karras et al. 2022 ("Elucidating the design
      space of diffusion-based generative models", table 1) and
      ``x0_hat = c_skip x + c_out F(c_in x; c_noise)`` with the coefficients of
      :func:`difflax.parametrization.edm_preconditioning` at the noise level ``sigma / alpha``
      of ``x / alpha`` (``sigma_data`` defaults to the process's own, else 0.5);
    * ``"eps"`` (Ho et al. 2020), ``"x0"``, ``"v"`` (Salimans & Ho 2022), ``"score"`` or
      ``"velocity"`` (flow matching): ``net(x_t, t)`` is converted to ``x0`` by
      :func:`difflax.as_denoiser`.

    The network's noise input (``t``, or ``c_noise`` for ``"edm"``) is multiplied by
    ``noise_scale``, e.g. ``1000`` to give a positional embedding DDPM-like step indices
    when ``t`` lies in ``[0, 1]``. A network returning twice the channels of ``x_t``
    (learned variance, as a DiT with ``learn_sigma=True``) contributes its first half.
    ``y``, ``train`` and ``self_cond`` are passed to ``net``.

    ``functools.partial(model.apply, variables, y=y)`` is then a denoiser for every sampler.
    """

    net: nn.Module
    process: Process
    prediction: str = "edm"
    sigma_data: float | None = None
    noise_scale: float = 1.0

    def __post_init__(self):
        check_prediction(self.prediction, (*PREDICTIONS, "edm"))
        super().__post_init__()

    def __call__(self, x_t: Array, t: Array, y: Array | None = None, *, train: bool = False, self_cond=None) -> Array:
        channels = x_t.shape[-1]

        def apply_fn(x, noise):
            out = self.net(x, self.noise_scale * noise, y, train=train, self_cond=self_cond)
            if out.ndim == x.ndim and out.shape[-1] == 2 * channels:
                out = out[..., :channels]
            return out

        return as_denoiser(apply_fn, self.process, self.prediction, sigma_data=self.sigma_data)(x_t, t)
