"""Distribution matching distillation (Yin et al. 2024, "One-step diffusion with distribution matching distillation").

A one-step generator ``G(z)`` is trained so that the diffused distribution of its samples
matches the teacher's at every noise level. The gradient of
``KL(p_fake,t || p_real,t)`` with respect to a generated sample is the score difference
``s_fake - s_real = alpha (D_fake - D_real) / sigma^2``; DMD estimates it with the frozen
teacher ``D_real`` and an auxiliary *fake* denoiser ``D_fake`` trained on the generator's
samples, normalizing per example by ``mean |x - D_real(x_t)|`` (eq. 8):

    g = (D_fake(x_t, t) - D_real(x_t, t)) / mean|x - D_real(x_t, t)|,   x_t = alpha_t x + sigma_t eps,
    L_G = 1/2 |x - stop_gradient(x - g)|^2     (so dL_G/dx = g),

with ``t`` drawn with log-SNR uniform on ``[0.02, 0.98]`` of the process's log-SNR range. The fake
denoiser minimizes the ordinary denoising loss on ``stop_gradient(G(z))``. DMD adds a regression loss on
(noise, teacher sample) pairs (:func:`difflax.distill.teacher_trajectories`) to prevent
mode collapse; the paper uses LPIPS, difflax an L2 distance (:func:`dmd_regression_loss`).
Diff-Instruct (Luo et al. 2023) is the same generator gradient without normalization or
regression (``normalize=False``).

DMD2 (Yin et al. 2024b, "Improved distribution matching distillation for fast image synthesis")
drops the regression loss and keeps DMD stable by a two time-scale update (the fake denoiser takes
several steps per generator step) and adds a GAN: a small head ``D`` on the fake denoiser's bottleneck
features classifies noised real data against noised generated samples, with the non-saturating loss
(Goodfellow et al. 2014; DMD2 eq. 5-6) at ``t`` drawn as for the distribution-matching gradient:

    L_D = softplus(-D(x_t^real, t)) + softplus(D(x_t^fake, t)),      L_G^GAN = softplus(-D(x_t^fake, t)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from difflax.losses import denoising_loss, sample_t_logsnr_uniform

__all__ = [
    "dmd_critic_loss",
    "dmd_fake_loss",
    "dmd_generator_gan_loss",
    "dmd_generator_loss",
    "dmd_regression_loss",
]


def _sample_t(key, batch, process, t_range, dtype):
    """``t`` with log-SNR uniform on the ``t_range`` fractions of the process's log-SNR range
    (for a VP process close to DMD's uniform timesteps in ``[0.02 T, 0.98 T]``; for EDM or VE,
    uniform time would put almost every sample at the highest noise levels)."""
    lo = process.log_snr(jnp.asarray(process.t_max, dtype))
    hi = process.log_snr(jnp.asarray(process.t_min, dtype))
    return sample_t_logsnr_uniform(
        key, (batch,), process, lo + t_range[0] * (hi - lo), lo + t_range[1] * (hi - lo), dtype=dtype
    )


def dmd_generator_loss(x, real, fake, process, key, *, t_range=(0.02, 0.98), normalize: bool = True):
    """Per-example distribution-matching loss of generated samples ``x`` (differentiable in ``x``).

    ``real`` (the teacher) and ``fake`` are denoisers; both are evaluated under ``stop_gradient``.
    """
    k_t, k_eps = jax.random.split(key)
    batch = x.shape[0]
    t = _sample_t(k_t, batch, process, t_range, x.dtype)
    x_t = process.marginal(jax.lax.stop_gradient(x), t, jax.random.normal(k_eps, x.shape, x.dtype))
    d_real = jax.lax.stop_gradient(real(x_t, t))
    d_fake = jax.lax.stop_gradient(fake(x_t, t))
    g = d_fake - d_real
    if normalize:
        scale = jnp.mean(jnp.abs(jax.lax.stop_gradient(x) - d_real).reshape(batch, -1), axis=1)
        g = g / jnp.maximum(scale, 1e-8).reshape((batch,) + (1,) * (x.ndim - 1))
    goal = jax.lax.stop_gradient(x - g)
    return 0.5 * jnp.sum(jnp.square(x - goal).reshape(batch, -1), axis=1)


def dmd_fake_loss(fake, process, x, key, *, weighting: str = "edm", prediction: str = "x0"):
    """Per-example denoising loss of the fake denoiser on generated samples ``stop_gradient(x)``.

    ``fake`` is a denoiser; the loss weighs its ``x0`` error (:func:`difflax.losses.denoising_loss`)
    with log-SNR uniform over the process's range.
    """
    k_t, k_eps = jax.random.split(key)
    x = jax.lax.stop_gradient(x)
    t = _sample_t(k_t, x.shape[0], process, (0.0, 1.0), x.dtype)
    eps = jax.random.normal(k_eps, x.shape, x.dtype)
    return denoising_loss(fake, process, x, t, eps, prediction=prediction, weighting=weighting)


def dmd_regression_loss(generated, teacher_samples):
    """Per-example mean squared distance between ``G(z_ref)`` and the teacher's sample from ``z_ref``."""
    batch = generated.shape[0]
    return jnp.mean(jnp.square(generated - teacher_samples).reshape(batch, -1), axis=1)


def _noised(x, process, key, t_range):
    k_t, k_eps = jax.random.split(key)
    t = _sample_t(k_t, x.shape[0], process, t_range, x.dtype)
    return process.marginal(x, t, jax.random.normal(k_eps, x.shape, x.dtype)), t


def dmd_generator_gan_loss(critic, x, process, key, *, t_range=(0.02, 0.98)):
    """Per-example non-saturating GAN loss ``softplus(-D(x_t, t))`` of generated samples ``x``
    (differentiable in ``x``); ``critic(x_t, t) -> logits`` is held fixed by the caller."""
    x_t, t = _noised(x, process, key, t_range)
    return jax.nn.softplus(-critic(x_t, t))


def dmd_critic_loss(critic, x_fake, x_real, process, key, *, t_range=(0.02, 0.98)):
    """Per-example discriminator loss ``softplus(-D(x_t^real)) + softplus(D(x_t^fake))`` of the GAN head
    ``critic(x_t, t) -> logits``, on ``stop_gradient(x_fake)`` and the data ``x_real`` noised to independent
    levels (both batches the same size)."""
    k_fake, k_real = jax.random.split(key)
    fake_t, t_f = _noised(jax.lax.stop_gradient(x_fake), process, k_fake, t_range)
    real_t, t_r = _noised(x_real, process, k_real, t_range)
    return jax.nn.softplus(-critic(real_t, t_r)) + jax.nn.softplus(critic(fake_t, t_f))
