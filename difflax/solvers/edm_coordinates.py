"""Every process is the EDM process after scaling (Karras et al. 2022).

Karras et al. ("Elucidating the design space of diffusion-based generative models",
2022, sec. 2 and app. C) observe that ``x_t = alpha(t) x0 + sigma(t) eps`` is, after
dividing by ``alpha(t)``, the EDM process ``y = x0 + s eps`` at the noise level
``s = sigma(t) / alpha(t) = exp(-log_snr(t) / 2)``; the probability-flow ODEs of the two
are the same curves in these coordinates. So a solver stepping in ``(y, s)`` with the
denoiser ``D_edm(y, s) = D(alpha(t(s)) y, t(s))`` is a solver for any process; this is
what the "discrete" schedulers of k-diffusion and diffusers (``EulerDiscreteScheduler``,
``HeunDiscreteScheduler``, ...) do with ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``
and the input scaling ``1 / sqrt(sigma^2 + 1) = alpha``.

>>> denoise_edm, edm = to_edm(denoise, process)
>>> y0, _ = difflax.sample(denoise_edm, edm, x_T / process.alpha(t_T), solver="heun", grid=sigmas)

Since ``alpha(0) = 1`` for every process, ``y`` at ``s = 0`` is a sample in the original
coordinates.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from difflax.processes import EDM, broadcast_to, once_per_batch
from difflax.solvers.grids import LOG_SNR_CLIP

__all__ = ["edm_sigma", "to_edm"]


def edm_sigma(process, t):
    """The EDM noise level ``s = sigma(t) / alpha(t) = exp(-log_snr(t) / 2)`` of time ``t``."""
    return jnp.exp(-0.5 * process.log_snr(t))


def to_edm(denoise: Callable, process, sigma_data: float | None = None) -> tuple[Callable, EDM]:
    """``(denoise_edm, edm_process)``: ``denoise`` of ``process`` as a denoiser of the EDM process.

    ``denoise_edm(y, s) = denoise(alpha(t) y, t)`` with ``t = process.t_from_log_snr(-2 log s)``.
    The EDM process spans the noise levels of ``[t_min, t_max]`` (log-SNR clipped at
    +-30 where it is infinite); ``sigma_data`` defaults to the process's own, else 0.5.
    """

    def time_and_alpha(s):
        t = process.t_from_log_snr(-2.0 * jnp.log(s))
        return t, process.alpha(t)

    def denoise_edm(y, s):
        s = jnp.asarray(s, dtype=jnp.result_type(s, y.dtype))
        t, alpha = once_per_batch(time_and_alpha, s)  # a sampler's s is one level for the whole batch
        return denoise(broadcast_to(alpha, y) * y, t)

    def level(t):
        # As the time grids: finite EDM levels for the flow interpolant, whose log-SNR is infinite at both ends.
        lam = jnp.clip(process.log_snr(jnp.asarray(t, jnp.result_type(float))), -LOG_SNR_CLIP, LOG_SNR_CLIP)
        out = jnp.exp(-0.5 * lam)
        return out if isinstance(out, jax.core.Tracer) else float(out)

    sd = sigma_data if sigma_data is not None else getattr(process, "sigma_data", 0.5)
    return denoise_edm, EDM(sigma_data=sd, t_min=level(process.t_min), t_max=level(process.t_max))
