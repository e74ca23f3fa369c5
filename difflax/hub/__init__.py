"""Pretrained PyTorch-world checkpoints (diffusers layouts) to difflax models, and back.

* :func:`convert_unet2d` / :func:`export_unet2d`: DDPM / ADM pixel U-Nets (``UNet2DModel``) as
  :class:`~difflax.models.UNet2D`.
* :func:`convert_dit` / :func:`export_dit`: Diffusion Transformers (``DiTTransformer2DModel``,
  e.g. DiT-XL-2-256) as :class:`~difflax.models.DiTTransformer2D`.
* :func:`convert_autoencoder_kl` / :func:`export_autoencoder_kl`: the Stable Diffusion VAE
  (``AutoencoderKL``) as :class:`~difflax.models.AutoencoderKL`; :func:`save_autoencoder_kl` writes a
  VAE trained here (:func:`difflax.train.autoencoder.fit_autoencoder`) as such a folder.

A converter reads a model folder (``config.json`` plus safetensors, no torch needed), uses
every tensor exactly once with its shape checked, and returns the model, its parameters and
what makes it a denoiser (:class:`CheckpointInfo`: the DDPM process of the scheduler config
and the prediction type). Export writes the same tensors back, bit for bit.
"""

from difflax.hub.common import ConversionError, load_config, load_tensors
from difflax.hub.dit import convert_dit, dit_from_config, export_dit
from difflax.hub.pipeline import CheckpointInfo
from difflax.hub.unet import convert_unet2d, export_unet2d, unet2d_from_config
from difflax.hub.vae import (
    autoencoder_kl_config,
    autoencoder_kl_from_config,
    convert_autoencoder_kl,
    export_autoencoder_kl,
    save_autoencoder_kl,
)

__all__ = [
    "CheckpointInfo",
    "ConversionError",
    "autoencoder_kl_config",
    "autoencoder_kl_from_config",
    "convert_autoencoder_kl",
    "convert_dit",
    "convert_unet2d",
    "dit_from_config",
    "export_autoencoder_kl",
    "export_dit",
    "export_unet2d",
    "load_config",
    "load_tensors",
    "save_autoencoder_kl",
    "unet2d_from_config",
]
