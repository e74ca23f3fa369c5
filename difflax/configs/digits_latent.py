"""Latent diffusion on the digits: a small class-conditional DiT on VAE latents, sampled with CFG.

The latent DiT recipe (:mod:`difflax.configs.imagenet256_dit_latent`, Peebles & Xie 2023) at a size for a
CPU. First encode the digits with a VAE (a diffusers ``AutoencoderKL`` folder, or a pipeline's root
holding ``vae/``; ``difflax-train-vae`` trains one on the digits in a few minutes), then train on the
latents; ``difflax-sample`` decodes samples with the VAE recorded in the latents' ``vae.json``::

    difflax-train-vae --out=~/data/digits_vae --dataset=digits --image_size=16
    difflax-encode-latents --vae=~/data/digits_vae --dataset=digits --image_size=16 --out=~/data/digits_latents
    difflax-train --config=digits_latent --workdir=workdir/digits_latent
    difflax-sample --workdir=workdir/digits_latent

The latents are read as ``(z - shift_factor) * scaling_factor`` (:mod:`difflax.data.encode`).
The job's own ``samples.png`` and metrics are in latent space (sliced Wasserstein distance to the
training latents); the decoded images are written by ``difflax-sample``.
"""

import ml_collections

from difflax.configs import imagenet256_dit_latent


def get_config():
    config = imagenet256_dit_latent.get_config()  # the DiT recipe; fields not set here keep its values
    config.name = "digits_latent"

    config.data.name = "latents:~/data/digits_latents"  # a directory written by difflax-encode-latents
    config.data.image_size = None  # the latent size follows the VAE (16x16 digits, factor 2: 8x8)

    config.model.kwargs = ml_collections.ConfigDict(
        {
            "patch_size": 2,
            "hidden_size": 64,
            "depth": 4,
            "num_heads": 4,
            "learn_sigma": False,  # fixed variances: the trainer has no loss for a variance half
            "embedding": "positional",
            "frequency_dim": 64,
            "max_period": 10_000.0,
            "dropout": 0.0,
        }
    )

    config.optim.learning_rate = 1e-3
    config.optim.schedule = "cosine"
    config.optim.warmup_steps = 100

    config.train.steps = 2000
    config.train.batch_size = 64
    config.train.ema_decay = 0.999
    config.train.ema_warmup = True
    config.train.log_every = 50
    config.train.save_every = 1000

    config.sample.solver = "dpmpp_2m"  # DPM-Solver++(2M): 25 steps instead of DiT's 250 ancestral ones
    config.sample.steps = 25
    config.sample.grid = "logsnr"
    config.sample.guidance_scale = 2.0  # CFG gamma; the null class is num_classes (p_uncond = 0.1)

    config.eval.num_samples = 100
    config.eval.every = 0  # no sample grids during training (each decodes with the VAE)
    return config
