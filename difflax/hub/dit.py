"""diffusers ``DiTTransformer2DModel`` checkpoints (``DiT-XL-2-256``) <-> :class:`~difflax.models.DiTTransformer2D`.

``convert_dit(path)`` reads a model folder (``config.json`` and the weights, or a pipeline
root with ``transformer/``) into a :class:`~difflax.models.DiTTransformer2D`, its parameters
and a :class:`~difflax.hub.pipeline.CheckpointInfo`; ``export_dit`` writes the parameters
back under the checkpoint's tensor names.

Every block of the layout holds its own timestep + label embedding
(``transformer_blocks.{i}.norm1.emb.*``). When all blocks hold the same values, as in
checkpoints converted from the paper's code, the model is built with ``tie_embeddings=True``
and keeps one copy (the paper's parameter count; the other copies are compared, not
dropped silently); ``export_dit`` writes it into every block again.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from difflax.hub.common import ConversionError, TensorSource, load_tensors
from difflax.hub.layout import check_tree, export_params, import_params
from difflax.hub.pipeline import CheckpointInfo, checkpoint_info, model_folder, read_config, require
from difflax.models.dit_transformer import DiTTransformer2D

__all__ = ["convert_dit", "dit_from_config", "export_dit"]

# DiTTransformer2DModel's config keys and their defaults (DiT-XL/2, 256px).
_DEFAULTS = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": None,
    "num_layers": 28,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "attention_bias": True,
    "sample_size": 32,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "upcast_attention": False,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-5,
}
# DiT checkpoints saved before the class existed say "Transformer2DModel" (diffusers reads those with
# norm_type "ada_norm_zero" as DiTTransformer2DModel and ignores these keys).
_LEGACY = {"Transformer2DModel": ("cross_attention_dim", "num_vector_embeds", "use_linear_projection",
                                  "only_cross_attention", "double_self_attention", "attention_type", "caption_channels",
                                  "interpolation_scale", "use_additional_conditions")}
# Config keys that are fields of DiTTransformer2D as they are (norm_num_groups is unused by the layout,
# upcast_attention is moot in float32).
_FIELDS = ("num_attention_heads", "attention_head_dim", "out_channels", "num_layers", "dropout", "attention_bias",
           "sample_size", "patch_size", "activation_fn", "num_embeds_ada_norm", "norm_eps")


def _emb_prefix(block: int) -> str:
    return f"transformer_blocks.{block}.norm1.emb."


def dit_from_config(config: dict, num_train_timesteps: int = 1000, tie_embeddings: bool = False) -> DiTTransformer2D:
    """The :class:`DiTTransformer2D` of a ``DiTTransformer2DModel`` config (defaults filled in)."""
    require(config, "norm_type", ("ada_norm_zero",))
    require(config, "norm_elementwise_affine", (False,))
    require(config, "activation_fn", ("gelu-approximate", "gelu"))
    if config["num_embeds_ada_norm"] is None:
        raise ConversionError("config key 'num_embeds_ada_norm' is None; the layout needs the number of classes.")
    return DiTTransformer2D(**{k: config[k] for k in _FIELDS}, tie_embeddings=tie_embeddings,
                            time_scale=float(num_train_timesteps), time_shift=-1.0)


def _param_shapes(model: DiTTransformer2D, in_channels: int):
    x = jax.ShapeDtypeStruct((1, model.sample_size, model.sample_size, in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), x, t, y)["params"]


def _tied(tensors: dict[str, np.ndarray], num_layers: int) -> bool:
    """Whether every block's embedding tensors equal block 0's."""
    first = {k.removeprefix(_emb_prefix(0)): v for k, v in tensors.items() if k.startswith(_emb_prefix(0))}
    return bool(first) and num_layers > 1 and all(
        _emb_prefix(i) + k in tensors and np.array_equal(tensors[_emb_prefix(i) + k], v)
        for i in range(1, num_layers)
        for k, v in first.items()
    )


def convert_dit(path: str, scheduler: dict | str | None = None) -> tuple[DiTTransformer2D, dict, CheckpointInfo]:
    """``(model, params, info)`` of a ``DiTTransformer2DModel`` folder, every tensor used and shape-checked.

    ``scheduler`` as in :func:`~difflax.hub.convert_unet2d` (by default the pipeline's
    ``scheduler/scheduler_config.json``). The network reads NHWC latents, the process time
    ``t`` (embedding the step ``n = N t - 1`` of ``info.process``) and labels ``y`` (``None``:
    the null class). With learned sigma (``out_channels = 2 C``) the first ``C`` output channels
    are the prediction: ``difflax.train.builders.make_denoiser(model, params, info.process,
    info.prediction, y)`` takes them.
    """
    folder = model_folder(path, "transformer")
    config = read_config(folder, "DiTTransformer2DModel", _DEFAULTS, _LEGACY)
    info = checkpoint_info(folder, config, scheduler)
    tensors = load_tensors(folder)
    tied = _tied(tensors, config["num_layers"])
    model = dit_from_config(config, info.process.num_steps, tie_embeddings=tied)
    source = TensorSource(tensors, origin=folder)
    params = import_params(_param_shapes(model, config["in_channels"]), source)
    if tied:  # the copies in blocks 1.. equal block 0's (checked above): mark them used
        for name in [k for k in tensors if k.startswith(_emb_prefix(0))]:
            for i in range(1, model.num_layers):
                source.take(_emb_prefix(i) + name.removeprefix(_emb_prefix(0)), tensors[name].shape)
    source.finish()
    return model, params, info


def export_dit(model: DiTTransformer2D, params) -> dict[str, np.ndarray]:
    """The ``DiTTransformer2DModel`` state dict of ``params`` (float32 NumPy, PyTorch axis order).

    A model with ``tie_embeddings`` writes its one embedding into every block.
    """
    kernel = params.get("pos_embed.proj", {}).get("kernel")
    if kernel is None:
        raise ConversionError("parameter pos_embed.proj/kernel is missing from params: "
                              "they are not DiTTransformer2D parameters.")
    check_tree(_param_shapes(model, kernel.shape[2]), params)
    tensors = export_params(params)
    if model.tie_embeddings:
        for name in [k for k in tensors if k.startswith(_emb_prefix(0))]:
            for i in range(1, model.num_layers):
                tensors[_emb_prefix(i) + name.removeprefix(_emb_prefix(0))] = tensors[name].copy()
    return tensors
