"""Two-dimensional toy data (swiss roll, moons, Gaussian-mixture grid or rings) with a residual MLP.

``difflax-train --config=toy2d:moons`` (the argument picks the data; the default is ``grid``).
"""

import ml_collections

from difflax.configs import digits


def get_config(data: str = "grid"):
    config = digits.get_config()
    config.name = "toy2d"
    config.data.name = data  # swiss_roll, moons, grid (5x5 mixture) or rings (8 modes)
    config.data.image_size = None  # not an image dataset

    config.process.name = "flow"  # rectified flow / flow matching
    config.process.kwargs = ml_collections.ConfigDict({"t_min": 1e-3, "t_max": 1.0})

    config.model.name = "mlp"
    config.model.prediction = "velocity"  # conditional flow matching
    config.model.noise_scale = 1.0
    config.model.class_conditional = False
    config.model.kwargs = ml_collections.ConfigDict(
        {"features": 128, "num_blocks": 3, "embedding": "fourier", "fourier_scale": 4.0}
    )

    config.loss.weighting = "simple"
    config.loss.t_sampler = "uniform"
    config.loss.p_uncond = 0.0

    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 100

    config.train.steps = 2000
    config.train.batch_size = 256
    config.train.ema_decay = 0.99
    config.train.save_every = 500

    config.sample.solver = "heun"
    config.sample.steps = 16
    config.sample.grid = "uniform"

    config.eval.num_samples = 2000
    return config
