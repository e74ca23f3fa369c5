"""Flax linen networks for diffusion and flow models.

Every model is called as ``model.apply(variables, x, t, y=None, train=False, self_cond=None)``
and predicts a quantity of the shape of ``x``; :func:`difflax.as_denoiser` turns it into a
denoiser ``x0_hat(x_t, t)`` (:func:`difflax.train.builders.make_denoiser` does so for a
model and its parameters).

* :class:`UNet`: DDPM++ / ADM U-Net for images (Song et al. 2021; Dhariwal & Nichol 2021).
* :class:`DiT`: Diffusion Transformer (Peebles & Xie 2023); standard sizes via :func:`dit`.
* :class:`UNet2D`, :class:`DiTTransformer2D`: the DDPM U-Net and DiT in the tensor layouts of
  published PyTorch checkpoints (diffusers' ``UNet2DModel``, ``DiTTransformer2DModel``), which
  :mod:`difflax.hub` reads exactly.
* :class:`AutoencoderKL`: the KL-regularized autoencoder of latent diffusion (Rombach et al. 2022),
  in the layout of the Stable Diffusion VAE.
* :class:`MLPResNet`: residual MLP for low-dimensional data.
* :class:`FeatureCritic`: a discriminator head on the bottleneck features the U-Net, DiT and MLP sow
  (:data:`FEATURES`), the GAN of DMD2 (:func:`difflax.train.distill.dmd2`).
* :class:`AdvKDStudent`, :class:`AdvKDCritics`: the one-pass student and per-stage critics of
  adversarial knowledge distillation (:mod:`difflax.distill.advkd`).
"""

from difflax.models.advkd import AdvKDCritics, AdvKDStudent, advkd_networks
from difflax.models.autoencoder import AutoencoderKL, DiagonalGaussian, autoencoder_loss
from difflax.models.dit import DIT_CONFIGS, DiT, DiTBlock, dit, dit_config, sincos_position_embedding
from difflax.models.dit_transformer import DiTTransformer2D
from difflax.models.embeddings import (
    ClassEmbedding,
    ConditionEmbedding,
    fourier_features,
    sinusoidal_embedding,
)
from difflax.models.layers import FEATURES, FeatureCritic, SelfAttention
from difflax.models.mlp import MLPResBlock, MLPResNet
from difflax.models.unet import AttentionBlock, ResBlock, UNet
from difflax.models.unet2d import UNet2D

__all__ = [
    "DIT_CONFIGS",
    "FEATURES",
    "AdvKDCritics",
    "AdvKDStudent",
    "AttentionBlock",
    "AutoencoderKL",
    "ClassEmbedding",
    "ConditionEmbedding",
    "DiT",
    "DiTBlock",
    "DiTTransformer2D",
    "DiagonalGaussian",
    "FeatureCritic",
    "MLPResBlock",
    "MLPResNet",
    "ResBlock",
    "SelfAttention",
    "UNet",
    "UNet2D",
    "advkd_networks",
    "autoencoder_loss",
    "dit",
    "dit_config",
    "fourier_features",
    "sincos_position_embedding",
    "sinusoidal_embedding",
]
