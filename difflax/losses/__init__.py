"""Training losses for diffusion and flow models.

* :mod:`~difflax.losses.denoising`: the weighted denoising loss of every prediction
  (:func:`denoising_loss`, :func:`loss_weight`, :data:`WEIGHTINGS`) and flow matching;
* :mod:`~difflax.losses.noise_levels`: draws of the training time ``t`` (uniform,
  log-SNR uniform, EDM log-normal, integer DDPM steps);
* :mod:`~difflax.losses.ddpm`: the discrete DDPM variational bound and iDDPM's hybrid loss;
* :mod:`~difflax.losses.classifier`: the noise-conditional classifier of classifier guidance;
* :func:`drop_condition`: condition dropout for classifier-free guidance
  (from :mod:`difflax.conditions`).

Every loss returns one value per example, shape ``(batch,)``.
"""

from difflax.conditions import drop_condition
from difflax.losses.classifier import noisy_classifier_loss
from difflax.losses.ddpm import (
    HYBRID_PREDICTIONS,
    VARIANCE_KINDS,
    ddpm_model_log_variance,
    ddpm_posterior,
    ddpm_prior_kl,
    ddpm_vlb,
    ddpm_vlb_terms,
    discretized_gaussian_log_likelihood,
    hybrid_loss,
    normal_kl,
)
from difflax.losses.denoising import REDUCTIONS, WEIGHTINGS, denoising_loss, flow_matching_loss, loss_weight
from difflax.losses.noise_levels import sample_ddpm_steps, sample_t_edm, sample_t_logsnr_uniform, sample_t_uniform

__all__ = [
    "HYBRID_PREDICTIONS",
    "REDUCTIONS",
    "VARIANCE_KINDS",
    "WEIGHTINGS",
    "ddpm_model_log_variance",
    "ddpm_posterior",
    "ddpm_prior_kl",
    "ddpm_vlb",
    "ddpm_vlb_terms",
    "denoising_loss",
    "discretized_gaussian_log_likelihood",
    "drop_condition",
    "flow_matching_loss",
    "hybrid_loss",
    "loss_weight",
    "noisy_classifier_loss",
    "normal_kl",
    "sample_ddpm_steps",
    "sample_t_edm",
    "sample_t_logsnr_uniform",
    "sample_t_uniform",
]
