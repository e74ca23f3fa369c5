"""diffusers ``AutoencoderKL`` checkpoints (the Stable Diffusion VAE) to difflax's ``AutoencoderKL``, and back.

The Flax modules carry diffusers' module names, so a parameter's path gives the tensor's name:
``encoder/down_blocks_0/resnets_1/conv1/kernel`` is ``encoder.down_blocks.0.resnets.1.conv1.weight``
(``name_<i>`` is ``name.<i>``; ``kernel`` and GroupNorm's ``scale`` are ``weight``). Values change
layout only: a convolution kernel is ``(H, W, in, out)`` here and ``(out, in, H, W)`` in PyTorch, a
dense kernel is the transpose of a ``Linear`` weight. Both directions are exact.

The middle block's attention is read in diffusers' current names (``to_q``, ``to_k``, ``to_v``,
``to_out.0``) or in the older ones of checkpoints saved before them (``query``, ``key``, ``value``,
``proj_attn``), and always written in the current ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from difflax.hub.common import ConversionError, TensorSource, load_config, load_tensors
from difflax.hub.pipeline import model_folder
from difflax.models.autoencoder import AutoencoderKL

__all__ = ["autoencoder_kl_config", "autoencoder_kl_from_config", "convert_autoencoder_kl", "export_autoencoder_kl",
           "save_autoencoder_kl"]

# config.json keys of diffusers' AutoencoderKL: those that shape the model, and those only reported in `info`.
_MODEL_KEYS = ("block_out_channels", "layers_per_block", "latent_channels", "out_channels", "norm_num_groups",
               "scaling_factor", "shift_factor", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")
_INFO_KEYS = ("scaling_factor", "shift_factor", "sample_size", "latents_mean", "latents_std", "force_upcast")
_FIXED = {"act_fn": "silu"}
_KNOWN = {*_MODEL_KEYS, *_INFO_KEYS, *_FIXED, "in_channels", "down_block_types", "up_block_types"}
_LEGACY_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def autoencoder_kl_from_config(config: dict) -> tuple[AutoencoderKL, int]:
    """The model a diffusers ``AutoencoderKL`` ``config.json`` describes, and its input channels.

    Raises :class:`ConversionError` naming the key for another class, block type or activation,
    or a key this layout does not know.
    """
    name = config.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise ConversionError(f"config key '_class_name' is {name!r}; this converter reads 'AutoencoderKL'.")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _KNOWN)
    if unknown:
        raise ConversionError(f"unknown AutoencoderKL config key(s) {', '.join(map(repr, unknown))}; "
                              f"known: {', '.join(sorted(_KNOWN))}.")
    for key, value in _FIXED.items():
        if config.get(key, value) != value:
            raise ConversionError(f"config key {key!r} is {config[key]!r}; this layout has {value!r}.")
    levels = len(config.get("block_out_channels", (64,)))
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(config.get(key, [block] * levels))
        if types != [block] * levels:
            raise ConversionError(f"config key {key!r} is {types}; this layout has {levels} x {block!r}.")
    kwargs = {k: config[k] for k in _MODEL_KEYS if k in config}
    kwargs["block_out_channels"] = tuple(kwargs.get("block_out_channels", (64,)))
    return AutoencoderKL(**kwargs), int(config.get("in_channels", 3))


def _torch_name(path: tuple[str, ...]) -> str:
    *modules, leaf = path
    modules = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
    return ".".join([*modules, "bias" if leaf == "bias" else "weight"])


# Axis permutations by rank: convolution kernels HWIO <-> OIHW, dense kernels (in, out) <-> Linear (out, in).
_TO_TORCH = {4: (3, 2, 0, 1), 2: (1, 0), 1: (0,)}
_FROM_TORCH = {4: (2, 3, 1, 0), 2: (1, 0), 1: (0,)}


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[axis] for axis in _TO_TORCH[len(shape)])


def _param_shapes(model: AutoencoderKL, in_channels: int) -> dict[str, Any]:
    """The parameter tree's shapes, built abstractly (nothing is allocated)."""
    side = 2 ** (len(model.block_out_channels) - 1)
    x = jax.ShapeDtypeStruct((1, side, side, in_channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def _source_name(name: str, source: TensorSource) -> str:
    """``name``, or its pre-``to_q`` spelling when only that is in the checkpoint."""
    for new, old in _LEGACY_ATTENTION.items():
        marker = f".attentions.0.{new}."
        if marker in name:
            legacy = name.replace(marker, f".attentions.0.{old}.")
            return legacy if not source.has(name) and source.has(legacy) else name
    return name


def convert_autoencoder_kl(path: str | os.PathLike) -> tuple[AutoencoderKL, dict, dict]:
    """``(model, params, info)`` from a diffusers ``AutoencoderKL`` directory (``config.json`` and weights),
    or from a pipeline's root holding it in ``vae/``.

    ``model.apply({"params": params}, x, method="encode")`` then matches diffusers' ``encode`` on the
    NCHW transpose of ``x``. ``info`` holds ``scaling_factor`` and ``shift_factor`` (the model applies
    them in ``to_latent`` / ``from_latent``) and, where the config has them, ``sample_size``,
    ``latents_mean``, ``latents_std`` and ``force_upcast``. Every tensor is used exactly once and its shape
    checked; otherwise :class:`ConversionError` names the tensor and nothing is returned.
    """
    path = model_folder(os.fspath(path), "vae")
    config = load_config(path)
    model, in_channels = autoencoder_kl_from_config(config)
    source = TensorSource(load_tensors(path), origin=path)

    def take(key_path, shape):
        keys = tuple(k.key for k in key_path)
        name = _source_name(_torch_name(keys), source)
        value = source.take(name, _torch_shape(shape.shape))
        return jnp.asarray(value.transpose(_FROM_TORCH[value.ndim]))

    params = jax.tree_util.tree_map_with_path(take, _param_shapes(model, in_channels))
    source.finish()
    info = {"scaling_factor": model.scaling_factor, "shift_factor": model.shift_factor}
    info.update({k: config[k] for k in _INFO_KEYS if k in config and k not in info})
    return model, params, info


def export_autoencoder_kl(model: AutoencoderKL, params: dict) -> dict[str, np.ndarray]:
    """``params`` of ``model`` as diffusers ``AutoencoderKL`` tensors (NumPy, by state-dict name).

    The inverse of :func:`convert_autoencoder_kl`: save them with ``safetensors.numpy.save_file``
    next to the model's ``config.json``. Raises :class:`ConversionError` naming the parameter when
    ``params`` is not the parameter tree of ``model``.
    """
    params = params.get("params", params)
    try:
        in_channels = params["encoder"]["conv_in"]["kernel"].shape[2]
    except (KeyError, TypeError, IndexError, AttributeError):
        raise ConversionError("parameter 'encoder/conv_in/kernel' is missing from params or not a "
                              "convolution kernel.") from None
    given = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    tensors = {}
    for key_path, shape in jax.tree_util.tree_flatten_with_path(_param_shapes(model, in_channels))[0]:
        keys = tuple(k.key for k in key_path)
        label = "/".join(keys)
        if key_path not in given:
            raise ConversionError(f"parameter {label!r} is missing from params.")
        value = np.asarray(given.pop(key_path))
        if value.shape != shape.shape:
            raise ConversionError(f"parameter {label!r} has shape {value.shape}; the model expects {shape.shape}.")
        tensors[_torch_name(keys)] = np.ascontiguousarray(value.transpose(_TO_TORCH[value.ndim]))
    if given:
        extra = sorted("/".join(str(getattr(k, "key", k)) for k in p) for p in given)
        raise ConversionError(f"params has parameters the model does not: {', '.join(extra)}.")
    return tensors


def autoencoder_kl_config(model: AutoencoderKL, in_channels: int, sample_size: int | None = None) -> dict:
    """The diffusers ``AutoencoderKL`` ``config.json`` of ``model`` (inverse of :func:`autoencoder_kl_from_config`)."""
    levels = len(model.block_out_channels)
    config = {"_class_name": "AutoencoderKL", "in_channels": int(in_channels), **_FIXED,
              "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels}
    for key in _MODEL_KEYS:
        value = getattr(model, key)
        config[key] = list(value) if key == "block_out_channels" else value
    if sample_size is not None:
        config["sample_size"] = int(sample_size)
    return config


def save_autoencoder_kl(model: AutoencoderKL, params: dict, path: str | os.PathLike, *,
                        sample_size: int | None = None) -> str:
    """Write ``model`` and ``params`` as a diffusers ``AutoencoderKL`` folder: ``config.json`` and
    ``diffusion_pytorch_model.safetensors`` (what :func:`convert_autoencoder_kl` and diffusers'
    ``AutoencoderKL.from_pretrained`` read).

    The folder is written under a temporary name and renamed when complete, so an interrupted save
    leaves no folder that looks whole; an existing ``path`` is refused (:class:`FileExistsError`).
    Returns the folder's path.
    """
    from safetensors.numpy import save_file

    path = os.path.expanduser(os.fspath(path))
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; save_autoencoder_kl writes a new folder.")
    tensors = export_autoencoder_kl(model, params)
    in_channels = tensors["encoder.conv_in.weight"].shape[1]
    partial = f"{path}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # the remains of an interrupted save
    os.makedirs(partial)
    with open(os.path.join(partial, "config.json"), "w") as f:
        json.dump(autoencoder_kl_config(model, in_channels, sample_size), f, indent=2)
    save_file(tensors, os.path.join(partial, "diffusion_pytorch_model.safetensors"))
    os.replace(partial, path)
    return path
