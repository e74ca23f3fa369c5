"""U-Net of the DDPM++ / ADM family for images in NHWC layout.

The architecture follows Ho et al. 2020 ("Denoising diffusion probabilistic models"),
with the improvements of Song et al. 2021 (DDPM++: BigGAN-style residual up/down-sampling,
skip rescaling by ``1/sqrt(2)``, Fourier noise features) and Dhariwal & Nichol 2021
("Diffusion models beat GANs", ADM: scale-shift (FiLM) conditioning through the
GroupNorm, multi-head attention at several resolutions, class embedding, zero-initialized
output layers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from difflax.models.embeddings import ConditionEmbedding
from difflax.models.layers import FEATURES, SelfAttention, maybe_remat, with_self_condition

Array = jax.Array
Dtype = Any

__all__ = ["AttentionBlock", "ResBlock", "Resample", "UNet"]

_ZEROS = nn.initializers.zeros_init()
# DDPM++'s default initializer (Song et al. 2021): Glorot-uniform variance scaling.
_INIT = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def _group_norm(groups: int, name: str) -> nn.GroupNorm:
    # Statistics and output in float32 whatever the compute dtype (mixed precision).
    return nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


class Resample(nn.Module):
    """2x up-sampling (nearest neighbour) or down-sampling (average pooling) of NHWC maps.

    With ``conv=True`` the up-sampling is followed by a 3x3 convolution and the
    down-sampling is a stride-2 3x3 convolution instead of pooling (DDPM, ADM).
    """

    direction: str
    conv: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = lambda stride: nn.Conv(
            x.shape[-1],
            (3, 3),
            strides=stride,
            padding=((1, 1), (1, 1)),
            kernel_init=_INIT,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )
        if self.direction == "up":
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            return conv(1)(x) if self.conv else x
        if self.conv:
            return conv(2)(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class ResBlock(nn.Module):
    """Residual block with scale-shift noise conditioning (ADM, Dhariwal & Nichol 2021, sec. 3).

    ``h = conv(SiLU(GN(x)))``; ``h = conv0(dropout(SiLU(GN(h) (1 + s) + b)))`` with ``(s, b)`` a
    linear map of the conditioning vector and ``conv0`` zero-initialized, so the block starts
    as its skip path. ``resample="up"|"down"`` re-samples inside the block (BigGAN-style,
    as in DDPM++ and ADM). ``rescale_skip`` divides the sum by ``sqrt(2)`` (DDPM++).
    """

    out_channels: int
    norm_groups: int = 32
    dropout: float = 0.0
    deterministic: bool = True
    resample: str | None = None
    rescale_skip: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        conv = lambda features, kernel, name, init=_INIT: nn.Conv(
            features, kernel, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=init, name=name
        )
        h = nn.silu(_group_norm(self.norm_groups, "norm1")(x))
        if self.resample is not None:
            h = Resample(self.resample, name="resample_h")(h)
            x = Resample(self.resample, name="resample_x")(x)
        h = conv(self.out_channels, (3, 3), "conv1")(h)
        film = nn.Dense(
            2 * self.out_channels, kernel_init=_INIT, dtype=self.dtype, param_dtype=self.param_dtype, name="film"
        )(nn.silu(c))
        scale, shift = jnp.split(film.astype(jnp.float32)[:, None, None, :], 2, axis=-1)
        h = _group_norm(self.norm_groups, "norm2")(h) * (1.0 + scale) + shift
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(nn.silu(h))
        h = conv(self.out_channels, (3, 3), "conv2", _ZEROS)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, (1, 1), "skip")(x)
        out = x + h
        return out / math.sqrt(2.0) if self.rescale_skip else out


class AttentionBlock(nn.Module):
    """``x + Attention(GN(x))`` over the ``H * W`` positions, output projection zero-initialized."""

    num_heads: int
    norm_groups: int = 32
    rescale_skip: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        batch, height, width, channels = x.shape
        h = _group_norm(self.norm_groups, "norm")(x).reshape(batch, height * width, channels)
        h = SelfAttention(
            self.num_heads,
            zero_init_out=True,
            kernel_init=_INIT,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attention",
        )(h)
        out = x + h.reshape(x.shape)
        return out / math.sqrt(2.0) if self.rescale_skip else out


class UNet(nn.Module):
    """DDPM++ / ADM U-Net: ``UNet(...)(x, t, y=None, *, train=False, self_cond=None)`` with ``x`` NHWC.

    Each of the ``len(channel_mult)`` levels has ``num_res_blocks`` :class:`ResBlock` of width
    ``base_channels * channel_mult[level]`` (followed by an :class:`AttentionBlock` where the
    feature-map height is in ``attention_resolutions``) and, except the last, a 2x
    down-sampling: a re-sampling ResBlock if ``resblock_updown`` (DDPM++, ADM) else a strided
    convolution (DDPM). The middle is ResBlock-Attention-ResBlock; the decoder mirrors the
    encoder with ``num_res_blocks + 1`` blocks per level fed by the skip connections.
    Output layers are zero-initialized (ADM), so the network outputs zero at initialization.

    Conditioning: the noise level ``t`` (shape ``()`` or ``(batch,)``) goes through a
    ``"positional"`` or ``"fourier"`` embedding of ``base_channels`` frequencies and an MLP of
    width ``4 base_channels`` (:class:`~difflax.models.embeddings.ConditionEmbedding`); with
    ``num_classes`` set, labels ``y`` are added, ``y=None`` or ``y == num_classes`` being the
    null class of classifier-free guidance. ``self_condition=True`` concatenates
    ``self_cond`` (a previous ``x0`` estimate, zeros when ``None``) to the input channels.

    ``head_channels`` (ADM's 64) fixes the width per attention head, else ``num_heads``
    heads are used. ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``); parameters are
    ``param_dtype``; norms, the conditioning vector and the output are float32. ``remat``
    rematerializes every block's activations in the backward pass (``True``, or a policy name of
    :data:`~difflax.models.layers.REMAT_POLICIES`). ``out_channels``
    defaults to the input channels.

    ``guidance_embedding=True`` adds the guidance strength ``w`` to the conditioning (guidance
    distillation, Meng et al. 2023; see :class:`~difflax.models.embeddings.ConditionEmbedding`).
    """

    base_channels: int = 128
    channel_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (16,)
    num_heads: int = 4
    head_channels: int | None = None
    dropout: float = 0.1
    resblock_updown: bool = True
    rescale_skip: bool = False
    norm_groups: int = 32
    num_classes: int | None = None
    embedding: str = "positional"
    max_period: float = 10_000.0
    fourier_scale: float = 16.0
    out_channels: int | None = None
    self_condition: bool = False
    guidance_embedding: bool = False
    remat: bool | str = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _check(self, x: Array) -> None:
        if x.ndim != 4:
            raise ValueError(f"x must be NHWC (4 axes); got shape {x.shape}.")
        height, width = x.shape[1:3]
        factor = 2 ** (len(self.channel_mult) - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"image size {height}x{width} must be divisible by the down-sampling factor "
                f"2^(len(channel_mult) - 1) = {factor} (channel_mult={tuple(self.channel_mult)})."
            )
        visited = [height // 2**level for level in range(len(self.channel_mult))]
        unknown = sorted(set(self.attention_resolutions) - set(visited))
        if unknown:
            raise ValueError(
                f"attention_resolutions {unknown} are not resolutions the U-Net visits; for {height}x{width} "
                f"inputs and channel_mult={tuple(self.channel_mult)} the feature-map heights are {visited}."
            )
        for mult in self.channel_mult:
            width_ = self.base_channels * mult
            if width_ % self.norm_groups:
                raise ValueError(f"norm_groups={self.norm_groups} must divide every level's width; got {width_}.")
            if self.head_channels is not None and width_ % self.head_channels:
                raise ValueError(f"head_channels={self.head_channels} must divide every level's width; got {width_}.")

    @nn.compact
    def __call__(
        self, x: Array, t: Array, y: Array | None = None, *, train: bool = False, self_cond=None, w=None
    ) -> Array:
        self._check(x)
        out_channels = self.out_channels or x.shape[-1]
        x = with_self_condition(x, self_cond, self.self_condition)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res_block = maybe_remat(ResBlock, self.remat)
        attn_block = maybe_remat(AttentionBlock, self.remat)

        def block(h, c, width, name, resample=None):
            return res_block(
                width,
                self.norm_groups,
                self.dropout,
                not train,
                resample,
                self.rescale_skip,
                **kw,
                name=name,
            )(h, c)

        def resample(h, c, direction, name):
            if self.resblock_updown:
                return block(h, c, h.shape[-1], name, resample=direction)
            return Resample(direction, conv=True, **kw, name=name)(h)

        def attention(h, name):
            heads = h.shape[-1] // self.head_channels if self.head_channels else self.num_heads
            return attn_block(heads, self.norm_groups, self.rescale_skip, **kw, name=name)(h)

        c = ConditionEmbedding.of(self, 4 * self.base_channels, self.base_channels)(t, y, x.shape[0], w)

        h = nn.Conv(self.base_channels * self.channel_mult[0], (3, 3), kernel_init=_INIT, **kw, name="conv_in")(x)
        skips = [h]
        resolution = x.shape[1]
        last = len(self.channel_mult) - 1
        for level, mult in enumerate(self.channel_mult):
            for i in range(self.num_res_blocks):
                h = block(h, c, self.base_channels * mult, f"down{level}_block{i}")
                if resolution in self.attention_resolutions:
                    h = attention(h, f"down{level}_attn{i}")
                skips.append(h)
            if level != last:
                h = resample(h, c, "down", f"down{level}_resample")
                skips.append(h)
                resolution //= 2

        h = block(h, c, h.shape[-1], "mid_block1")
        h = attention(h, "mid_attn")
        h = block(h, c, h.shape[-1], "mid_block2")
        self.sow("intermediates", FEATURES, h)

        for level in reversed(range(len(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
                h = block(h, c, self.base_channels * self.channel_mult[level], f"up{level}_block{i}")
                if resolution in self.attention_resolutions:
                    h = attention(h, f"up{level}_attn{i}")
            if level:
                h = resample(h, c, "up", f"up{level}_resample")
                resolution *= 2

        h = nn.silu(_group_norm(self.norm_groups, "norm_out")(h))
        h = nn.Conv(out_channels, (3, 3), kernel_init=_ZEROS, **kw, name="conv_out")(h)
        return h.astype(jnp.float32)
