"""Class-conditional ImageNet 256x256 with DiT-XL/2 on precomputed Stable Diffusion VAE latents.

Peebles & Xie 2023, "Scalable diffusion models with transformers": DiT-XL/2 (675M
parameters) on the 32x32x4 latents of the ``sd-vae-ft-ema`` autoencoder (FID 2.27 with
250 DDPM steps and CFG 1.5 after 7M steps). The latents are encoded ahead of time (see
:mod:`difflax.data.latents` for the format: NHWC ``latents`` with ``labels``, optionally
with ``scale`` = 0.18215 when raw VAE means are stored)::

    difflax-train --config=imagenet256_dit_latent --workdir=workdir/dit \\
        --config.data.name=latents:/data/imagenet256_sdvae

Differences from DiT: fixed variances (``learn_sigma=False``: the trainer has no hybrid
loss); no random flips of the latents
(encode flipped images too for that); float32 (``model.dtype="bfloat16"`` for
mixed precision). Decode samples with the same VAE (after dividing by the scale).
"""

import ml_collections

from difflax.configs import digits


def get_config():
    config = digits.get_config()  # fields not set here keep the defaults documented in the digits recipe
    # DiT-XL/2 with EMA and Adam is ~11 GB per device replicated: shard it over every device (FSDP).
    config.mesh.data, config.mesh.fsdp = 1, -1
    config.name = "imagenet256_dit_latent"

    config.data.name = "latents:~/data/imagenet256_sdvae"  # difflax.data.latents: .npz or dir of .npy
    config.data.image_size = 32  # latent height and width (256 / 8), checked against the file

    config.process.name = "ddpm_linear"  # discrete VP, DDPM's linear betas
    config.process.kwargs = ml_collections.ConfigDict(
        {
            "num_steps": 1000,
            "beta_start": 1e-4,
            "beta_end": 0.02,
        }
    )

    config.model.name = "dit"
    config.model.prediction = "eps"
    config.model.noise_scale = 1000.0  # the network sees 1000 t = DDPM step + 1, DiT's timestep scale
    config.model.class_conditional = True  # 1000 classes plus the null class of CFG
    config.model.kwargs = ml_collections.ConfigDict(
        {
            "size": "XL/2",  # depth 28, hidden 1152, 16 heads, patch 2 (difflax.models.dit_config)
            "learn_sigma": False,  # DiT learns variances; no loss of the trainer trains a variance half
            "embedding": "positional",  # sinusoidal timestep embedding
            "frequency_dim": 256,
            "max_period": 10_000.0,
            "dropout": 0.0,
        }
    )

    config.loss.weighting = "simple"  # eps MSE
    config.loss.t_sampler = "ddpm"  # uniform integer steps 0..999
    config.loss.p_uncond = 0.1  # class_dropout_prob: the null class for CFG

    config.optim.optimizer = "adamw"
    config.optim.learning_rate = 1e-4
    config.optim.schedule = "constant"
    config.optim.warmup_steps = 0  # DiT: no warm-up
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.weight_decay = 0.0
    config.optim.grad_clip = 0.0  # DiT does not clip (non-finite updates are still skipped)

    config.train.steps = 400_000  # the paper's comparisons; its best model trained 7M steps
    config.train.batch_size = 256
    config.train.ema_decay = 0.9999
    config.train.ema_warmup = False  # DiT starts the EMA at the initial weights, decay 0.9999 throughout
    config.train.log_every = 100
    config.train.save_every = 50_000
    config.train.keep = 2

    config.sample.solver = "ddpm"  # DiT's ancestral sampler
    config.sample.steps = 250
    config.sample.grid = "uniform"
    config.sample.guidance_scale = 1.5  # CFG gamma = 1 + w for guided sampling (not used by the trainer)

    config.eval.num_samples = 256  # latents drawn in one batch after training, unguided
    config.eval.every = 50_000  # a sample grid in samples/ every this many steps
    return config
