"""Class-conditional ImageNet 64x64 with the ADM U-Net, trained for classifier-free guidance.

Architecture and optimization of Dhariwal & Nichol 2021 ("Diffusion models beat GANs",
table 14: ImageNet 64, 296M parameters) with the label dropout of Ho & Salimans 2022
("Classifier-free diffusion guidance", p_uncond 0.1). Needs the tfds extra and the
dataset prepared as ArrayRecord (``tfds build imagenet_resized/64x64
--file_format=array_record``)::

    difflax-train --config=imagenet64_unet_cfg --workdir=workdir/imagenet64

Differences from ADM: fixed (not learned) variances, so the simple eps loss instead of the
hybrid loss with learn_sigma; float32 (``model.dtype="bfloat16"`` for mixed
precision); tfds's ``imagenet_resized`` is box-downsampled, ADM center-crops (use
``data.name="tfds:imagenet2012"`` with ``image_size=64`` for ADM's crop and filters).
Guided sampling: ``difflax.guidance.cfg(denoise_cond, y, sample.guidance_scale,
null=1000)``; the trainer's own evaluation samples without guidance.
"""

import ml_collections

from difflax.configs import digits


def get_config():
    config = digits.get_config()  # fields not set here keep the defaults documented in the digits recipe
    config.name = "imagenet64_unet_cfg"

    config.data.name = "tfds:imagenet_resized/64x64"  # difflax.data.tfds: ArrayRecord + grain, random flips
    config.data.image_size = 64  # already 64x64 (no resizing); other sizes are center-cropped and resized

    config.process.name = "ddpm_cosine"  # discrete VP, cosine alpha-bar (Nichol & Dhariwal 2021)
    config.process.kwargs = ml_collections.ConfigDict({"num_steps": 1000})  # diffusion_steps

    config.model.name = "unet"
    config.model.prediction = "eps"  # ADM predicts eps
    config.model.noise_scale = 1000.0  # the network sees 1000 t = DDPM step + 1, ADM's timestep scale
    config.model.class_conditional = True  # 1000 classes plus the null class of CFG
    config.model.kwargs = ml_collections.ConfigDict(
        {
            "base_channels": 192,  # num_channels
            "channel_mult": (1, 2, 3, 4),  # widths 192, 384, 576, 768 at 64, 32, 16, 8
            "num_res_blocks": 3,
            "attention_resolutions": (32, 16, 8),
            "head_channels": 64,  # num_head_channels: heads = width / 64
            "num_heads": 4,  # unused while head_channels is set
            "dropout": 0.1,
            "resblock_updown": True,  # BigGAN-style re-sampling ResBlocks
            "rescale_skip": False,  # ADM sums residuals without rescaling
            "norm_groups": 32,
            "embedding": "positional",  # sinusoidal timestep embedding
            "max_period": 10_000.0,
        }
    )

    config.loss.weighting = "simple"  # eps MSE (L_simple)
    config.loss.t_sampler = "ddpm"  # uniform integer steps 0..999
    config.loss.p_uncond = 0.1  # label dropout: the same network is the unconditional model for CFG

    config.optim.optimizer = "adam"
    config.optim.learning_rate = 3e-4
    config.optim.schedule = "constant"
    config.optim.warmup_steps = 0  # ADM: no warm-up
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.grad_clip = 0.0  # ADM does not clip (non-finite updates are still skipped)

    config.train.steps = 540_000
    config.train.batch_size = 2048  # global; grad_accum > 1 fits it on fewer devices
    config.train.ema_decay = 0.9999
    config.train.log_every = 100
    config.train.save_every = 10_000
    config.train.keep = 2

    config.sample.solver = "dpmpp_2m"  # fast deterministic sampler (ADM's own: 250 ddpm steps)
    config.sample.steps = 25
    config.sample.grid = "logsnr"
    config.sample.guidance_scale = 1.5  # CFG gamma = 1 + w for guided sampling (not used by the trainer)

    config.eval.num_samples = 256  # drawn in one batch after training, unguided
    config.eval.every = 50_000  # a sample grid in samples/ every this many steps
    return config
