"""Toy 2-D data with the EDM process and preconditioning: the teacher recipe of the distillation benchmark.

``difflax-train --config=toy2d_edm --workdir=workdir/toy2d_edm``

Same data and MLP as :mod:`difflax.configs.toy2d`, but the network is EDM-preconditioned
(Karras et al. 2022) with ``sigma_data = 1``, so every distillation method of
:mod:`difflax.train.distill` (consistency models included) can start from it.
"""

import ml_collections

from difflax.configs import toy2d


def get_config():
    config = toy2d.get_config()
    config.name = "toy2d_edm"
    config.process.name = "edm"
    config.process.kwargs = ml_collections.ConfigDict({"sigma_data": 1.0, "t_min": 0.002, "t_max": 80.0})
    config.model.prediction = "edm"
    config.model.kwargs.fourier_scale = 1.0  # the noise input is c_noise = ln(sigma) / 4
    config.loss.weighting = "edm"
    config.loss.t_sampler = "edm"
    config.train.steps = 3000
    config.sample.solver = "heun"
    config.sample.steps = 18
    config.sample.grid = "karras"
    return config
