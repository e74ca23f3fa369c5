"""Solver demo on the exact denoiser of a 2-D Gaussian mixture (no training, no data)."""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Data: `num_modes` isotropic Gaussians of width `mode_std` on a ring of radius `radius`.
    config.data = ml_collections.ConfigDict()
    config.data.num_modes = 8
    config.data.radius = 2.0
    config.data.mode_std = 0.15
    # Forward process: one of vp, subvp, ve, edm, flow, ddpm_linear, ddpm_cosine.
    config.process = "vp"
    # Sampling: solvers compared at the same number of steps, on `grid`.
    config.sample = ml_collections.ConfigDict()
    config.sample.num_samples = 2000
    config.sample.steps = 10
    config.sample.grid = "logsnr"
    config.sample.solvers = ("ddim", "heun", "dpmpp_2m", "ddpm")
    config.sample.reference_steps = 500  # steps of the fine Heun solve used as the exact ODE endpoint
    return config
