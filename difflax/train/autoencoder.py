"""Training the latent diffusion autoencoder on an image dataset, and its latent scale.

:func:`fit_autoencoder` minimizes :func:`~difflax.models.autoencoder_loss` (squared error plus a
``beta``-weighted KL term, reparametrized posterior samples; Kingma & Welling 2014) with Adam through
:func:`~difflax.train.fit.fit`, then sets the model's ``scaling_factor`` to ``1 / std`` of the
training latents, the choice of section 4.3.2 of Rombach et al. (2022) that gives the diffusion model
inputs of about unit variance. The Stable Diffusion VAE adds a perceptual and a patch-GAN loss for
sharp natural images; on the small images this recipe is for (digits, toy images) the squared error
reconstructs well and needs no second network.

Save the result with :func:`difflax.hub.save_autoencoder_kl`: the folder is what
``difflax-encode-latents --vae`` reads (and diffusers' ``AutoencoderKL.from_pretrained``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from difflax.models.autoencoder import AutoencoderKL, autoencoder_loss
from difflax.train.fit import fit

__all__ = ["fit_autoencoder", "latent_scale"]


def latent_scale(model: AutoencoderKL, params, images: jax.Array, batch_size: int = 256) -> float:
    """``1 / std`` of the posterior means of ``images`` (one number over every latent value).

    Computed in jitted batches of ``batch_size`` (the last one padded), with ``params`` the module's
    ``params`` collection.
    """
    encode = jax.jit(lambda x: model.apply({"params": params}, x, method="encode").mode())
    images = np.asarray(images, np.float32)
    latents = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
        latents.append(np.asarray(encode(padded))[: len(chunk)])
    std = float(np.concatenate(latents).std())
    if not std > 0:
        raise ValueError(f"the latents have standard deviation {std}; the autoencoder has collapsed.")
    return 1.0 / std


def fit_autoencoder(
    model: AutoencoderKL,
    dataset,
    *,
    steps: int,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    beta: float = 1e-6,
    seed: int = 0,
    log_every: int = 100,
    scale_images: int = 1024,
    progress: bool = False,
):
    """Train ``model`` on ``dataset`` and fit its latent scale.

    Args:
      model: the :class:`~difflax.models.AutoencoderKL` to train (its ``out_channels`` must be the
        images' channels; ``scaling_factor`` is replaced).
      dataset: images in ``[-1, 1]`` through ``dataset.batch(seed, step, batch_size)["x"]``
        ``(B, H, W, C)`` and ``dataset.example_shape`` (e.g. :func:`difflax.data.make_dataset`).
      steps: optimizer steps.
      batch_size: images per step.
      learning_rate: Adam's step size, cosine-decayed to 0 after a warm-up of ``steps // 20``.
      beta: weight of the KL term (:func:`~difflax.models.autoencoder_loss`).
      seed: seeds the initialisation, the posterior samples and the data order.
      log_every: record the loss every this many steps.
      scale_images: the first this many images of the data stream set ``scaling_factor``
        (:func:`latent_scale`).

    Returns:
      ``(model, params, history)``: the model with its fitted ``scaling_factor``, its ``params``
      collection, and :func:`~difflax.train.fit.fit`'s metric history (``loss``,
      ``reconstruction`` and ``kl`` per image value).
    """
    shape = tuple(dataset.example_shape)
    if len(shape) != 3 or shape[-1] != model.out_channels:
        raise ValueError(f"dataset must hold (H, W, C) images with C = model.out_channels = {model.out_channels}; "
                         f"its examples have shape {shape}.")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1; got steps={steps}, batch_size={batch_size}.")
    key, init_key = jax.random.split(jax.random.key(seed))
    params = model.init(init_key, jnp.zeros((1, *shape), jnp.float32))["params"]

    def loss_fn(p, batch, key, state):
        del state
        return autoencoder_loss(model, {"params": p}, batch, key, beta)

    def batches(step):
        return jnp.asarray(dataset.batch(seed, step, batch_size)["x"], jnp.float32)

    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(steps // 20, 1), steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    state, history = fit(loss_fn, params, tx, batches, steps, key=key, log_every=log_every, progress=progress,
                         desc="autoencoder")
    images = np.concatenate([dataset.batch(seed, i, batch_size)["x"] for i in range(-(-scale_images // batch_size))])
    scale = latent_scale(model, state.params, images[:scale_images])
    return model.clone(scaling_factor=scale), state.params, history
