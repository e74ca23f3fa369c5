"""Class-conditional CIFAR-10 with EDM (Karras et al. 2022) and the DDPM++ architecture.

"Elucidating the design space of diffusion-based generative models", config F, VP/DDPM++
conditional (FID 1.79 with 18 Heun steps, 35 NFE). Needs the tfds extra and CIFAR-10
prepared as ArrayRecord (``tfds build cifar10 --file_format=array_record``)::

    difflax-train --config=cifar10_edm --workdir=workdir/cifar10_edm

Differences from EDM: horizontal flips instead of EDM's non-leaking augmentation pipeline
(p = 0.12, with augmentation labels); scale-shift instead of additive noise conditioning;
the EMA is an exponential decay matching EDM's 0.5 Mimg half-life (EDM ramps the half-life
up over training; here the usual (1 + step) / (10 + step) warm-up does that job).
"""

import ml_collections

from difflax.configs import digits

BATCH = 512
HALF_LIFE_IMAGES = 500_000  # EDM's ema_halflife_kimg = 500


def get_config():
    config = digits.get_config()  # fields not set here keep the defaults documented in the digits recipe
    config.name = "cifar10_edm"

    config.data.name = "tfds:cifar10"  # difflax.data.tfds: ArrayRecord + grain, random horizontal flips
    config.data.image_size = 32  # CIFAR-10's own size (no resizing)

    config.process.name = "edm"  # sigma(t) = t, alpha = 1
    config.process.kwargs = ml_collections.ConfigDict(
        {
            "sigma_data": 0.5,  # data standard deviation in the preconditioning
            "t_min": 0.002,  # sigma_min
            "t_max": 80.0,  # sigma_max
        }
    )

    config.model.name = "unet"
    config.model.prediction = "edm"  # the network is F of D = c_skip x + c_out F(c_in x; c_noise)
    config.model.noise_scale = 1.0  # the network sees c_noise = ln(sigma) / 4 as is
    config.model.class_conditional = True  # EDM's conditional model (label_dim 10)
    config.model.kwargs = ml_collections.ConfigDict(
        {
            "base_channels": 128,  # model_channels
            "channel_mult": (2, 2, 2),  # widths 256 at 32, 16, 8
            "num_res_blocks": 4,  # num_blocks
            "attention_resolutions": (16,),
            "num_heads": 1,  # SongUNet's blocks use one attention head
            "dropout": 0.13,
            "resblock_updown": True,  # re-sampling inside ResBlocks (resample_proj)
            "rescale_skip": True,  # skip_scale = sqrt(0.5)
            "norm_groups": 32,
            "embedding": "positional",  # DDPM++ embeds c_noise with sinusoids (channel_mult_noise 1)
            "max_period": 10_000.0,  # max_positions
        }
    )

    config.loss.weighting = "edm"  # lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
    config.loss.t_sampler = "edm"  # ln(sigma) ~ N(P_mean, P_std^2)
    config.loss.p_mean = -1.2  # P_mean
    config.loss.p_std = 1.2  # P_std
    config.loss.p_uncond = 0.0  # EDM trains no unconditional branch (no classifier-free guidance)

    config.optim.optimizer = "adam"
    config.optim.learning_rate = 1e-3  # lr 10e-4
    config.optim.schedule = "constant"  # constant after the warm-up
    config.optim.warmup_steps = 10_000_000 // BATCH  # lr_rampup_kimg = 10000 (10 Mimg)
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.grad_clip = 0.0  # EDM does not clip (non-finite updates are still skipped)

    config.train.steps = 200_000_000 // BATCH  # duration 200 Mimg = 390,625 steps
    config.train.batch_size = BATCH
    config.train.ema_decay = 0.5 ** (BATCH / HALF_LIFE_IMAGES)  # half-life 0.5 Mimg: decay 0.99929 per step
    config.train.ema_warmup = True  # stands in for EDM's half-life ramp-up (ema_rampup_ratio 0.05)
    config.train.log_every = 100
    config.train.save_every = 25_000
    config.train.keep = 2

    config.sample.solver = "heun"  # EDM's deterministic 2nd-order sampler
    config.sample.steps = 18  # 35 NFE
    config.sample.grid = "karras"  # rho = 7

    config.eval.num_samples = 256  # drawn in one batch after training (FID-50k needs its own sampling job)
    config.eval.every = 50_000  # a sample grid in samples/ every this many steps
    return config
