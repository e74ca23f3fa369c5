"""diffusers ``UNet2DModel`` checkpoints (DDPM / ADM-style pixel U-Nets) <-> :class:`~difflax.models.UNet2D`.

``convert_unet2d(path)`` reads a model folder (``config.json`` and
``diffusion_pytorch_model.safetensors``, or a pipeline root with ``unet/``) into a
:class:`~difflax.models.UNet2D`, its parameters and a
:class:`~difflax.hub.pipeline.CheckpointInfo` (the DDPM process of the scheduler config and
the prediction type); ``export_unet2d`` writes the parameters back under the checkpoint's
tensor names. Attention tensors of checkpoints saved before diffusers renamed them
(``query``, ``key``, ``value``, ``proj_attn``) are read under their current names
(``to_q``, ``to_k``, ``to_v``, ``to_out.0``), as diffusers does when it loads them.

Implemented: the positional timestep embedding, ``DownBlock2D`` / ``AttnDownBlock2D`` /
``UpBlock2D`` / ``AttnUpBlock2D`` with convolutional re-sampling, ``UNetMidBlock2D``, the
class embedding of ``num_class_embeds`` and both ``resnet_time_scale_shift`` modes. Any other
value of a config key raises :class:`~difflax.hub.ConversionError` naming the key.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from difflax.hub.common import ConversionError, TensorSource, load_tensors
from difflax.hub.layout import check_tree, export_params, import_params
from difflax.hub.pipeline import CheckpointInfo, checkpoint_info, model_folder, read_config, require
from difflax.models.unet2d import DOWN_BLOCK_TYPES, UP_BLOCK_TYPES, UNet2D

__all__ = ["convert_unet2d", "export_unet2d", "unet2d_from_config"]

# UNet2DModel's config keys and their defaults.
_DEFAULTS = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}
# Config keys that are fields of UNet2D as they are.
_FIELDS = ("out_channels", "block_out_channels", "layers_per_block", "add_attention", "attention_head_dim",
           "norm_num_groups", "attn_norm_num_groups", "norm_eps", "resnet_time_scale_shift", "mid_block_scale_factor",
           "downsample_padding", "flip_sin_to_cos", "freq_shift", "time_embedding_dim", "num_class_embeds",
           "center_input_sample", "dropout")
_OLD_ATTENTION = re.compile(r"\.attentions\.(\d+)\.(query|key|value|proj_attn)\.")
_NEW_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _block_types(config: dict, key: str, known: tuple[str, ...]) -> tuple[str, ...]:
    # diffusers reads "UNetResDownBlock2D" as "DownBlock2D" (and likewise for the others).
    types = tuple(kind.removeprefix("UNetRes") for kind in config[key])
    for kind in types:
        if kind not in known:
            raise ConversionError(f"config key {key!r} holds {kind!r}; supported block types: {', '.join(known)}.")
    return types


def unet2d_from_config(config: dict, num_train_timesteps: int = 1000) -> UNet2D:
    """The :class:`UNet2D` of a ``UNet2DModel`` config (defaults filled in), reading ``t = (n + 1) / N``."""
    require(config, "time_embedding_type", ("positional",))
    require(config, "act_fn", ("silu", "swish"))
    require(config, "class_embed_type", (None,))
    require(config, "mid_block_type", ("UNetMidBlock2D", None))
    require(config, "downsample_type", ("conv",))
    require(config, "upsample_type", ("conv",))
    require(config, "downsample_padding", (0, 1))
    require(config, "resnet_time_scale_shift", ("default", "scale_shift"))
    if config["norm_num_groups"] is None:
        raise ConversionError("config key 'norm_num_groups' is None; supported: an integer number of groups.")
    down = _block_types(config, "down_block_types", DOWN_BLOCK_TYPES)
    up = _block_types(config, "up_block_types", UP_BLOCK_TYPES)
    levels = len(config["block_out_channels"])
    if len(down) != levels or len(up) != levels:
        raise ConversionError(f"config keys 'down_block_types' and 'up_block_types' need one entry per "
                              f"'block_out_channels' ({levels}); got {len(down)} and {len(up)}.")
    fields = {k: tuple(config[k]) if isinstance(config[k], list) else config[k] for k in _FIELDS}
    return UNet2D(**fields, down_block_types=down, up_block_types=up, mid_block=config["mid_block_type"] is not None,
                  time_scale=float(num_train_timesteps), time_shift=-1.0)


def _param_shapes(model: UNet2D, in_channels: int):
    size = 2 ** (len(model.block_out_channels) - 1)
    x = jax.ShapeDtypeStruct((1, size, size, in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    y = None if model.num_class_embeds is None else jax.ShapeDtypeStruct((1,), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), x, t, y)["params"]


def _current_name(name: str) -> str:
    return _OLD_ATTENTION.sub(lambda m: f".attentions.{m[1]}.{_NEW_ATTENTION[m[2]]}.", name)


def convert_unet2d(path: str, scheduler: dict | str | None = None) -> tuple[UNet2D, dict, CheckpointInfo]:
    """``(model, params, info)`` of a ``UNet2DModel`` folder, every tensor used and shape-checked.

    ``scheduler`` is the training scheduler's config (a dict or a JSON file); by default
    ``scheduler_config.json`` beside the model or the pipeline's ``scheduler/`` is read. The
    denoiser is ``as_denoiser(lambda x, t: model.apply({"params": params}, x, t, y), info.process,
    info.prediction)`` with ``x`` NHWC and ``t`` the process time: the network embeds the step
    ``n = N t - 1`` of ``info.process`` exactly as the checkpoint embeds diffusers' timestep ``n``.
    """
    folder = model_folder(path, "unet")
    config = read_config(folder, "UNet2DModel", _DEFAULTS)
    info = checkpoint_info(folder, config, scheduler)
    model = unet2d_from_config(config, info.process.num_steps)
    source = TensorSource({_current_name(k): v for k, v in load_tensors(folder).items()}, origin=folder)
    params = import_params(_param_shapes(model, config["in_channels"]), source)
    source.finish()
    return model, params, info


def export_unet2d(model: UNet2D, params) -> dict[str, np.ndarray]:
    """The ``UNet2DModel`` state dict of ``params`` (float32 NumPy, PyTorch axis order), e.g. for ``safetensors``."""
    kernel = params.get("conv_in", {}).get("kernel")
    if kernel is None:
        raise ConversionError("parameter conv_in/kernel is missing from params: they are not UNet2D parameters.")
    check_tree(_param_shapes(model, kernel.shape[2]), params)
    return export_params(params)
