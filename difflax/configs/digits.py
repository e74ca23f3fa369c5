"""Default recipe: a small class-conditional U-Net on sklearn's 8x8 digits, EDM-style.

Runs in a few minutes on a 2-core CPU: ``difflax-train`` (the default recipe).
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.name = "digits"  # the recipe: names the default work directory and is checked on resume
    config.seed = 0  # seeds parameters, noise and the data order

    config.data = ml_collections.ConfigDict()
    config.data.name = "digits"  # "digits" or a toy2d name
    config.data.image_size = 8  # digits are padded (background) to this size

    config.process = ml_collections.ConfigDict()
    config.process.name = "edm"  # a name of difflax.processes.PROCESSES
    config.process.kwargs = ml_collections.ConfigDict({"sigma_data": 0.5, "t_min": 0.002, "t_max": 80.0})

    config.model = ml_collections.ConfigDict()
    config.model.name = "unet"  # unet, dit or mlp
    config.model.prediction = "edm"  # what the network outputs: edm (preconditioned F), eps, x0, v, velocity
    config.model.noise_scale = 1.0  # multiplies the network's noise input (c_noise for "edm")
    config.model.class_conditional = True  # labels in, null class for classifier-free guidance
    config.model.dtype = "float32"  # compute dtype: float32, bfloat16 or float16 (parameters stay float32)
    config.model.remat = "none"  # recompute block activations in the backward pass: "full", "dots" or "dots_all"
    config.model.kwargs = ml_collections.ConfigDict(
        {
            "base_channels": 16,
            "channel_mult": (1, 2),  # 8x8 and 4x4 feature maps
            "num_res_blocks": 1,
            "attention_resolutions": (4,),
            "num_heads": 2,
            "dropout": 0.0,
            "resblock_updown": False,  # strided-conv down-sampling, nearest-neighbour + conv up-sampling
            "norm_groups": 8,
            "embedding": "fourier",
            "fourier_scale": 1.0,
        }
    )

    config.loss = ml_collections.ConfigDict()
    config.loss.weighting = "edm"  # simple, elbo, snr, min_snr, edm, snr+1
    config.loss.t_sampler = "edm"  # uniform, logsnr, edm (log-normal sigma), ddpm
    config.loss.p_mean = -1.2  # EDM log-normal noise levels
    config.loss.p_std = 1.2
    config.loss.p_uncond = 0.1  # label dropout for classifier-free guidance

    config.optim = ml_collections.ConfigDict()
    config.optim.optimizer = "adam"  # adam or adamw
    config.optim.learning_rate = 2e-3
    config.optim.schedule = "cosine"  # constant or cosine (after warm-up)
    config.optim.warmup_steps = 200
    config.optim.b1 = 0.9
    config.optim.b2 = 0.99
    config.optim.eps = 1e-8
    config.optim.weight_decay = 0.0  # adamw only
    config.optim.grad_clip = 1.0  # global-norm clipping, 0 disables
    config.optim.grad_accum = 1  # accumulate gradients over this many steps
    config.optim.max_nonfinite = 20  # consecutive non-finite updates skipped before training stops

    # Device mesh: axis sizes for data parallelism, FSDP (parameters, EMA and Adam moments sharded) and
    # tensor parallelism; -1 takes the devices the others leave. A run resumes on another mesh.
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
    config.train = ml_collections.ConfigDict()
    config.train.steps = 2000
    config.train.batch_size = 64  # global batch, split over all devices and processes
    config.train.ema_decay = 0.999
    config.train.ema_warmup = True
    config.train.log_every = 50
    config.train.save_every = 1000
    config.train.keep = 2  # latest checkpoints kept
    config.train.keep_best = 1  # plus the best by loss
    config.train.async_checkpoint = True

    config.sample = ml_collections.ConfigDict()
    config.sample.solver = "heun"  # any name of difflax.solvers.SOLVERS
    config.sample.steps = 18  # 35 NFE with Heun (EDM's CIFAR-10 setting)
    config.sample.grid = "karras"

    config.eval = ml_collections.ConfigDict()
    config.eval.num_samples = 500  # samples scored against held-out digits
    config.eval.every = 500  # write samples/step_<N>.png every this many steps (0: never)
    return config
