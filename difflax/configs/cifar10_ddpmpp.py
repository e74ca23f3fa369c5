"""CIFAR-10 with the DDPM++ U-Net on the VP SDE: score_sde's ``vp/cifar10_ddpmpp_continuous``.

Song et al. 2021, "Score-based generative modeling through stochastic differential
equations" (FID 2.55 with 1000 Euler-Maruyama steps; their config ``configs/vp/
cifar10_ddpmpp_continuous.py``). Needs the tfds extra and CIFAR-10 prepared as ArrayRecord
(``tfds build cifar10 --file_format=array_record``)::

    difflax-train --config=cifar10_ddpmpp --workdir=workdir/cifar10_ddpmpp

Differences from score_sde: ResBlocks take the noise embedding as scale-shift (FiLM)
rather than added bias; one ``t_min`` (1e-3) serves training and sampling (score_sde
trains from 1e-5); the EMA warms up.
"""

import ml_collections

from difflax.configs import digits


def get_config():
    config = digits.get_config()  # fields not set here keep the defaults documented in the digits recipe
    config.name = "cifar10_ddpmpp"

    config.data.name = "tfds:cifar10"  # difflax.data.tfds: ArrayRecord + grain, random horizontal flips
    config.data.image_size = 32  # CIFAR-10's own size (no resizing)

    config.process.name = "vp"  # continuous VP SDE, linear beta(t)
    config.process.kwargs = ml_collections.ConfigDict(
        {
            "beta_min": 0.1,  # beta(0)
            "beta_max": 20.0,  # beta(1)
            "t_min": 1e-3,  # smallest training time and end of the sampling grid
            "t_max": 1.0,
        }
    )

    config.model.name = "unet"
    config.model.prediction = "eps"  # score_sde's VP network outputs -sigma * score = eps
    config.model.noise_scale = 999.0  # the network sees 999 t, as score_sde's continuous VP models
    config.model.class_conditional = False  # unconditional CIFAR-10
    config.model.kwargs = ml_collections.ConfigDict(
        {
            "base_channels": 128,  # nf
            "channel_mult": (1, 2, 2, 2),  # ch_mult: widths 128, 256, 256, 256 at 32, 16, 8, 4
            "num_res_blocks": 4,
            "attention_resolutions": (16,),  # attn_resolutions
            "num_heads": 1,  # DDPM++ attention has a single head
            "dropout": 0.1,
            "resblock_updown": True,  # resblock_type "biggan": re-sampling inside ResBlocks
            "rescale_skip": True,  # skip_rescale: residual sums divided by sqrt(2)
            "norm_groups": 32,  # GroupNorm groups (min(channels // 4, 32) = 32 here)
            "embedding": "positional",  # embedding_type "positional" (Fourier is for VE / NCSN++)
            "max_period": 10_000.0,  # sinusoidal periods up to 2 pi 10^4, for 999 t in [0, 999]
        }
    )

    config.loss.weighting = "simple"  # plain eps MSE (reduce_mean, no likelihood weighting)
    config.loss.t_sampler = "uniform"  # t ~ U[t_min, t_max]
    config.loss.p_uncond = 0.0  # unconditional: no label dropout

    config.optim.optimizer = "adam"
    config.optim.learning_rate = 2e-4
    config.optim.schedule = "constant"  # constant after the warm-up
    config.optim.warmup_steps = 5000  # linear warm-up
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.grad_clip = 1.0  # global-norm clipping at 1

    config.train.steps = 1_300_000  # n_iters
    config.train.batch_size = 128
    config.train.ema_decay = 0.9999  # ema_rate
    config.train.log_every = 100
    config.train.save_every = 50_000  # snapshot_freq
    config.train.keep = 2

    config.sample.solver = "dpmpp_2m"  # fast; score_sde's own: euler_maruyama, 1000 steps, uniform grid
    config.sample.steps = 20
    config.sample.grid = "logsnr"

    config.eval.num_samples = 256  # drawn in one batch after training (FID-50k needs its own sampling job)
    config.eval.every = 50_000  # a sample grid in samples/ every this many steps
    return config
