"""The pixel-space U-Net of DDPM (Ho et al. 2020) in the tensor layout of diffusers' ``UNet2DModel``.

This is the network of the published DDPM / ADM-style pixel checkpoints (e.g. the
``ddpm-cifar10-32`` family), written in Flax for NHWC images so that such a checkpoint
converts exactly (:mod:`difflax.hub.unet`). It differs from difflax's own
:class:`~difflax.models.UNet` in ways that change the output: the timestep embedding is
*added* to the features before the second GroupNorm (``resnet_time_scale_shift="default"``;
``"scale_shift"`` is the FiLM of ADM), attention sits in the blocks named by
``down_block_types`` / ``up_block_types`` with separate query / key / value maps, GroupNorm
``eps`` and the sinusoid's ``flip_sin_to_cos`` / ``freq_shift`` come from the checkpoint, and
the class embedding has no null class.

Module names are the checkpoint's: a parameter's path joined by ``"."`` is the tensor's name
(``kernel`` / ``scale`` / ``embedding`` for ``weight``), e.g.
``down_blocks.1.attentions.0.to_q.kernel`` <-> ``down_blocks.1.attentions.0.to_q.weight``.

Time: the network reads the process time ``t`` in ``[0, 1]`` and embeds the step index
``n = time_scale * t + time_shift``; the defaults give ``n = 1000 t - 1``, the DDPM step of
:class:`~difflax.processes.DiscreteVP` with 1000 steps (``t = (n + 1) / N``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from difflax.models.layers import with_self_condition

Array = jax.Array

__all__ = ["DOWN_BLOCK_TYPES", "UP_BLOCK_TYPES", "ResnetBlock2D", "SpatialAttention", "UNet2D", "step_index",
           "timestep_embedding"]

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D")
TIME_SCALE_SHIFTS = ("default", "scale_shift")


def timestep_embedding(
    n: Array, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10_000.0
) -> Array:
    """DDPM's sinusoidal embedding of step indices ``n`` (``(batch,)``) as ``(batch, dim)`` float32.

    ``[sin(n f_k), cos(n f_k)]`` with ``f_k = max_period^(-k / (dim / 2 - freq_shift))``,
    ``k < dim / 2`` (Ho et al. 2020 use ``freq_shift = 1``; DiT's layout too), halves swapped when
    ``flip_sin_to_cos``; an odd ``dim`` gets a trailing zero column.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = jnp.asarray(n, jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def step_index(t, batch: int, time_scale: float, time_shift: float) -> Array:
    """The network's step index ``time_scale * t + time_shift`` as a float32 ``(batch,)`` vector."""
    t = jnp.asarray(t, jnp.float32)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
        raise ValueError(f"t must be a scalar or have shape ({batch},) matching the batch of x; got shape {t.shape}.")
    return jnp.broadcast_to(time_scale * t.reshape(-1) + time_shift, (batch,))


def _conv(features: int, name: str, kernel: int = 3, stride: int = 1, padding=None) -> nn.Conv:
    pad = (kernel // 2, kernel // 2) if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=stride, padding=(pad, pad), name=name)


def _group_norm(groups: int, eps: float, name: str) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, name=name)


class ResnetBlock2D(nn.Module):
    """``(x + conv2(drop(SiLU(GN(conv1(SiLU(GN(x))) [+ temb])))) / output_scale_factor``.

    The projected timestep embedding ``Dense(SiLU(temb))`` is added before ``norm2``
    (``scale_shift=False``, DDPM) or applied as ``GN(h) (1 + scale) + shift`` (ADM). A 1x1
    ``conv_shortcut`` maps the skip path when the width changes.
    """

    out_channels: int
    groups: int
    eps: float
    scale_shift: bool = False
    output_scale_factor: float = 1.0
    dropout: float = 0.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array, temb: Array) -> Array:
        h = _conv(self.out_channels, "conv1")(nn.silu(_group_norm(self.groups, self.eps, "norm1")(x)))
        width = 2 * self.out_channels if self.scale_shift else self.out_channels
        temb = nn.Dense(width, name="time_emb_proj")(nn.silu(temb))[:, None, None, :]
        norm2 = _group_norm(self.groups, self.eps, "norm2")
        if self.scale_shift:
            scale, shift = jnp.split(temb, 2, axis=-1)
            h = norm2(h) * (1.0 + scale) + shift
        else:
            h = norm2(h + temb)
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(nn.silu(h))
        h = _conv(self.out_channels, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, "conv_shortcut", kernel=1)(x)
        return (x + h) / self.output_scale_factor


class SpatialAttention(nn.Module):
    """``(x + to_out(Attention(GN(x)))) / rescale`` over the ``H * W`` positions (DDPM's attention block).

    ``heads`` heads of width ``head_dim`` with separate ``to_q`` / ``to_k`` / ``to_v`` maps and
    logits scaled by ``1 / sqrt(head_dim)``; ``groups=None`` skips the GroupNorm.
    """

    heads: int
    head_dim: int
    groups: int | None
    eps: float
    rescale: float = 1.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        batch, height, width, channels = x.shape
        h = x.reshape(batch, height * width, channels)
        if self.groups is not None:
            h = _group_norm(self.groups, self.eps, "group_norm")(h)
        inner = self.heads * self.head_dim
        q, k, v = (
            nn.Dense(inner, name=name)(h).reshape(batch, height * width, self.heads, self.head_dim)
            for name in ("to_q", "to_k", "to_v")
        )
        h = jax.nn.dot_product_attention(q, k, v).reshape(batch, height * width, inner)
        h = nn.Dense(channels, name="to_out.0")(h).reshape(x.shape)
        return (h + x) / self.rescale


class UNet2D(nn.Module):
    """DDPM U-Net in the ``UNet2DModel`` layout: ``UNet2D(...)(x, t, y=None, *, train=False)``, ``x`` NHWC.

    Fields carry the checkpoint config's names and defaults. Level ``i`` of
    ``block_out_channels`` has ``layers_per_block`` :class:`ResnetBlock2D` (each followed by a
    :class:`SpatialAttention` for ``"AttnDownBlock2D"``) and, except the last level, a stride-2
    3x3 convolution (``downsample_padding=0`` pads only bottom and right, as TensorFlow's
    ``SAME``); the middle is ResNet-Attention-ResNet (no attention without ``add_attention``,
    none of it without ``mid_block``); up level ``i`` (``up_block_types[i]``, lowest resolution
    first) has ``layers_per_block + 1`` blocks fed by the skips and a nearest-neighbour 2x
    up-sampling followed by a 3x3 convolution. Attention heads have ``attention_head_dim``
    channels (``None``: one head). The timestep embedding is :func:`timestep_embedding` of
    ``block_out_channels[0]`` channels through ``Dense -> SiLU -> Dense`` of width
    ``time_embedding_dim`` (default ``4 block_out_channels[0]``), plus a learned class
    embedding of ``num_class_embeds`` rows when set (``y`` then required: there is no null
    class). ``center_input_sample`` maps ``x`` to ``2 x - 1`` first.
    """

    out_channels: int = 3
    block_out_channels: Sequence[int] = (224, 448, 672, 896)
    down_block_types: Sequence[str] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    up_block_types: Sequence[str] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 2
    mid_block: bool = True
    add_attention: bool = True
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 1
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    time_embedding_dim: int | None = None
    num_class_embeds: int | None = None
    center_input_sample: bool = False
    dropout: float = 0.0
    time_scale: float = 1000.0
    time_shift: float = -1.0

    def _check(self, x: Array, y) -> None:
        levels = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types"):
            if len(getattr(self, name)) != levels:
                raise ValueError(f"{name} must have one entry per block_out_channels ({levels}); "
                                 f"got {tuple(getattr(self, name))}.")
        for name, known in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            unknown = sorted(set(getattr(self, name)) - set(known))
            if unknown:
                raise ValueError(f"{name} holds {unknown}; known block types: {', '.join(known)}.")
        if self.resnet_time_scale_shift not in TIME_SCALE_SHIFTS:
            raise ValueError(f"resnet_time_scale_shift must be one of {TIME_SCALE_SHIFTS}; "
                             f"got {self.resnet_time_scale_shift!r}.")
        if x.ndim != 4:
            raise ValueError(f"x must be NHWC (4 axes); got shape {x.shape}.")
        factor = 2 ** (levels - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"image size {x.shape[1]}x{x.shape[2]} must be divisible by 2^(levels - 1) = {factor}.")
        if (y is None) != (self.num_class_embeds is None):
            raise ValueError("y is required: the model has a class embedding (num_class_embeds) without a null class."
                             if y is None else "y was given but the model has no class embedding (num_class_embeds).")

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None = None, *, train: bool = False, self_cond=None) -> Array:
        self._check(x, y)
        x = with_self_condition(jnp.asarray(x, jnp.float32), self_cond, False)
        if self.center_input_sample:
            x = 2.0 * x - 1.0
        channels = tuple(self.block_out_channels)
        temb_dim = self.time_embedding_dim or 4 * channels[0]
        n = step_index(t, x.shape[0], self.time_scale, self.time_shift)
        temb = timestep_embedding(n, channels[0], self.flip_sin_to_cos, self.freq_shift)
        temb = nn.Dense(temb_dim, name="time_embedding.linear_2")(
            nn.silu(nn.Dense(temb_dim, name="time_embedding.linear_1")(temb))
        )
        if self.num_class_embeds is not None:
            temb = temb + nn.Embed(self.num_class_embeds, temb_dim, name="class_embedding")(jnp.ravel(y))

        def resnet(h, width, name, scale=1.0):
            scale_shift = self.resnet_time_scale_shift == "scale_shift"
            return ResnetBlock2D(width, self.norm_num_groups, self.norm_eps, scale_shift, scale, self.dropout,
                                 not train, name=name)(h, temb)

        def attention(h, name, groups, rescale=1.0):
            head_dim = self.attention_head_dim or h.shape[-1]
            return SpatialAttention(h.shape[-1] // head_dim, head_dim, groups, self.norm_eps, rescale, name=name)(h)

        last = len(channels) - 1
        h = _conv(channels[0], "conv_in")(x)
        skips = [h]
        for i, kind in enumerate(self.down_block_types):
            for j in range(self.layers_per_block):
                h = resnet(h, channels[i], f"down_blocks.{i}.resnets.{j}")
                if kind == "AttnDownBlock2D":
                    h = attention(h, f"down_blocks.{i}.attentions.{j}", self.norm_num_groups)
                skips.append(h)
            if i != last:
                pad = (1, 1) if self.downsample_padding else (0, 1)
                h = _conv(channels[i], f"down_blocks.{i}.downsamplers.0.conv", stride=2, padding=pad)(h)
                skips.append(h)

        if self.mid_block:
            scale = self.mid_block_scale_factor
            h = resnet(h, channels[-1], "mid_block.resnets.0", scale)
            if self.add_attention:
                groups = self.attn_norm_num_groups
                if groups is None and self.resnet_time_scale_shift == "default":
                    groups = self.norm_num_groups
                h = attention(h, "mid_block.attentions.0", groups, scale)
            h = resnet(h, channels[-1], "mid_block.resnets.1", scale)

        for i, kind in enumerate(self.up_block_types):
            for j in range(self.layers_per_block + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = resnet(h, channels[last - i], f"up_blocks.{i}.resnets.{j}")
                if kind == "AttnUpBlock2D":
                    h = attention(h, f"up_blocks.{i}.attentions.{j}", self.norm_num_groups)
            if i != last:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
                h = _conv(channels[last - i], f"up_blocks.{i}.upsamplers.0.conv")(h)

        h = nn.silu(_group_norm(self.norm_num_groups, self.norm_eps, "conv_norm_out")(h))
        return _conv(self.out_channels, "conv_out")(h)
