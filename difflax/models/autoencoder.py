"""KL-regularized autoencoder of latent diffusion (Rombach et al. 2022), images in NHWC layout.

The encoder maps an image ``x`` to a diagonal Gaussian posterior ``q(z | x) = N(mean, exp(logvar))``
over a latent ``z`` with ``2 ** (len(block_out_channels) - 1)`` times smaller height and width; the
decoder maps ``z`` back to an image. Training minimizes the beta-weighted negative evidence lower bound
of the variational autoencoder (Kingma & Welling 2014, "Auto-encoding variational Bayes"; beta as in
Higgins et al. 2017), see :func:`autoencoder_loss`.

The layout is the one of the Stable Diffusion VAE (Rombach et al. 2022, appendix; diffusers'
``AutoencoderKL``): residual blocks of GroupNorm, SiLU and 3x3 convolutions, a stride-2 convolution
with asymmetric padding (one row and column after the image, none before) to down-sample,
nearest-neighbour up-sampling followed by a 3x3 convolution, a middle block of two residual blocks
around a single-head self-attention, and optional 1x1 ``quant_conv`` / ``post_quant_conv`` around the
latent. Submodules are named after diffusers' modules (``down_blocks_0/resnets_1/conv1`` for
``down_blocks.0.resnets.1.conv1``) so that :mod:`difflax.hub.vae` maps parameters by name.

Images and latents are channels-last, ``(batch, height, width, channels)``, like every difflax model.
Diffusion runs on ``to_latent(z) = (z - shift_factor) * scaling_factor`` (section 4.3.2 of
Rombach et al. 2022: the factor gives the latents about unit variance).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from difflax import pytree

Array = jax.Array
Dtype = Any

__all__ = [
    "AutoencoderKL",
    "DiagonalGaussian",
    "autoencoder_loss",
]

_EPS = 1e-6  # GroupNorm epsilon of the Stable Diffusion VAE


@pytree.dataclass
class DiagonalGaussian:
    """The posterior ``q(z | x) = N(mean, diag(exp(logvar)))``, NHWC arrays of the latent's shape.

    ``logvar`` is clipped to ``[-30, 20]`` by :meth:`AutoencoderKL.encode`, as in latent diffusion.
    """

    mean: Array
    logvar: Array

    def sample(self, key: Array) -> Array:
        """A reparametrized draw ``z = mean + exp(logvar / 2) * eps``, ``eps ~ N(0, I)`` (Kingma & Welling 2014)."""
        eps = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return self.mean + jnp.exp(0.5 * self.logvar) * eps

    def mode(self) -> Array:
        """The most likely latent, ``mean``."""
        return self.mean

    def kl(self) -> Array:
        """``KL(q || N(0, I)) = 1/2 sum(mean^2 + exp(logvar) - 1 - logvar)`` per example, shape ``(batch,)``."""
        terms = jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar
        return 0.5 * jnp.sum(terms, axis=tuple(range(1, terms.ndim)))


def _group_norm(groups: int, name: str) -> nn.GroupNorm:
    # Statistics and output in float32 whatever the compute dtype (mixed precision); the two-pass variance
    # E[(x - mean)^2] keeps float32 agreement with PyTorch's GroupNorm where E[x^2] - mean^2 would cancel.
    return nn.GroupNorm(num_groups=groups, epsilon=_EPS, use_fast_variance=False, dtype=jnp.float32,
                        param_dtype=jnp.float32, name=name)


def _conv(features: int, name: str, kernel: int = 3, stride: int = 1, padding: Any = 1, **kw) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=stride, padding=padding, name=name, **kw)


class ResnetBlock(nn.Module):
    """``x + conv2(SiLU(GN(conv1(SiLU(GN(x))))))``, the skip a 1x1 ``conv_shortcut`` when the width changes."""

    out_channels: int
    norm_groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _conv(self.out_channels, "conv1", **kw)(nn.silu(_group_norm(self.norm_groups, "norm1")(x)))
        h = _conv(self.out_channels, "conv2", **kw)(nn.silu(_group_norm(self.norm_groups, "norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, "conv_shortcut", kernel=1, padding=0, **kw)(x)
        return x + h


class Attention(nn.Module):
    """``x + to_out(softmax(q k^T / sqrt(C)) v)`` over the ``H * W`` positions, one head, ``q, k, v`` of ``GN(x)``."""

    norm_groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        batch, height, width, channels = x.shape
        h = _group_norm(self.norm_groups, "group_norm")(x).reshape(batch, height * width, 1, channels)
        dense = lambda name: nn.Dense(channels, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        h = jax.nn.dot_product_attention(dense("to_q")(h), dense("to_k")(h), dense("to_v")(h))
        h = dense("to_out_0")(h.reshape(batch, height * width, channels))
        return x + h.reshape(x.shape).astype(x.dtype)


class MidBlock(nn.Module):
    """Residual block, (optional) attention, residual block, at the lowest resolution."""

    norm_groups: int
    attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = x.shape[-1]
        x = ResnetBlock(channels, self.norm_groups, name="resnets_0", **kw)(x)
        if self.attention:
            x = Attention(self.norm_groups, name="attentions_0", **kw)(x)
        return ResnetBlock(channels, self.norm_groups, name="resnets_1", **kw)(x)


class _Resample(nn.Module):
    """2x down-sampling (``direction="down"``) by a stride-2 3x3 convolution padded by one row and column at
    the end only (none at the start, as in latent diffusion), or nearest-neighbour 2x up-sampling followed
    by a 3x3 convolution (``"up"``)."""

    direction: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.direction == "down":
            return _conv(x.shape[-1], "conv", stride=2, padding=((0, 1), (0, 1)), **kw)(x)
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(x.shape[-1], "conv", **kw)(x)


class Block(nn.Module):
    """``num_layers`` residual blocks to ``out_channels``, then 2x re-sampling if ``resample`` is "down" or "up"."""

    out_channels: int
    num_layers: int
    norm_groups: int
    resample: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.norm_groups, name=f"resnets_{j}", **kw)(x)
        if self.resample is None:
            return x
        return _Resample(self.resample, name=f"{self.resample}samplers_0", **kw)(x)


class Encoder(nn.Module):
    """Image ``(B, H, W, C)`` to posterior parameters ``(B, H / f, W / f, 2 * latent_channels)``."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    latent_channels: int
    norm_groups: int
    mid_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _conv(self.block_out_channels[0], "conv_in", **kw)(x)
        last = len(self.block_out_channels) - 1
        for i, channels in enumerate(self.block_out_channels):
            resample = "down" if i < last else None
            h = Block(channels, self.layers_per_block, self.norm_groups, resample, name=f"down_blocks_{i}", **kw)(h)
        h = MidBlock(self.norm_groups, self.mid_attention, name="mid_block", **kw)(h)
        h = nn.silu(_group_norm(self.norm_groups, "conv_norm_out")(h))
        return _conv(2 * self.latent_channels, "conv_out", **kw)(h)


class Decoder(nn.Module):
    """Latent ``(B, h, w, latent_channels)`` to image ``(B, h * f, w * f, out_channels)``."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    out_channels: int
    norm_groups: int
    mid_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _conv(self.block_out_channels[-1], "conv_in", **kw)(z)
        h = MidBlock(self.norm_groups, self.mid_attention, name="mid_block", **kw)(h)
        last = len(self.block_out_channels) - 1
        for i, channels in enumerate(reversed(self.block_out_channels)):
            resample = "up" if i < last else None
            h = Block(channels, self.layers_per_block + 1, self.norm_groups, resample, name=f"up_blocks_{i}", **kw)(h)
        h = nn.silu(_group_norm(self.norm_groups, "conv_norm_out")(h))
        return _conv(self.out_channels, "conv_out", **kw)(h)


class AutoencoderKL(nn.Module):
    """The latent diffusion VAE: ``encode(x) -> DiagonalGaussian``, ``decode(z) -> x_hat`` (module docstring).

    ``model.apply(variables, x, key)`` returns ``(x_hat, posterior)`` with ``x_hat`` decoded from a
    posterior sample (from its mean when ``key`` is None); ``method="encode"`` / ``"decode"`` run one half.
    Defaults are the Stable Diffusion VAE's except ``block_out_channels`` (``(128, 256, 512, 512)``
    and ``layers_per_block=2`` there). ``dtype`` is the compute dtype of convolutions and dense layers;
    GroupNorm, the posterior and the decoded images are float32.
    """

    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    out_channels: int = 3
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if not self.block_out_channels:
            raise ValueError("block_out_channels must name at least one width; got ().")
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every width of "
                                 f"block_out_channels={tuple(self.block_out_channels)}.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shared = dict(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
                      norm_groups=self.norm_num_groups, mid_attention=self.mid_block_add_attention, **kw)
        self.encoder = Encoder(latent_channels=self.latent_channels, **shared)
        self.decoder = Decoder(out_channels=self.out_channels, **shared)
        one_by_one = lambda features: nn.Conv(features, (1, 1), **kw)
        self.quant_conv = one_by_one(2 * self.latent_channels) if self.use_quant_conv else None
        self.post_quant_conv = one_by_one(self.latent_channels) if self.use_post_quant_conv else None

    def encode(self, x: Array) -> DiagonalGaussian:
        """The posterior ``q(z | x)`` of images ``x`` ``(B, H, W, C)``; ``H`` and ``W`` divisible by the down factor."""
        factor = 2 ** (len(self.block_out_channels) - 1)
        if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"x must be NHWC images with height and width divisible by {factor}; "
                             f"got shape {x.shape}.")
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, z: Array) -> Array:
        """Images ``(B, h * f, w * f, out_channels)`` from latents ``z`` ``(B, h, w, latent_channels)``."""
        if z.ndim != 4 or z.shape[-1] != self.latent_channels:
            raise ValueError(f"z must be NHWC latents with {self.latent_channels} channels; got shape {z.shape}.")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: Array, key: Array | None = None) -> tuple[Array, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.decode(z), posterior

    def to_latent(self, z: Array) -> Array:
        """The diffusion model's latent ``(z - shift_factor) * scaling_factor`` (no shift when None)."""
        return (z - (self.shift_factor or 0.0)) * self.scaling_factor

    def from_latent(self, latent: Array) -> Array:
        """The inverse of :meth:`to_latent`: ``latent / scaling_factor + shift_factor``, ready for :meth:`decode`."""
        return latent / self.scaling_factor + (self.shift_factor or 0.0)


def autoencoder_loss(model: AutoencoderKL, params: Any, x: Array, key: Array,
                     beta: float = 1e-6) -> tuple[Array, dict[str, Array]]:
    """The beta-VAE objective per image dimension, and its parts as metrics.

    ``loss = E_x[ ||x - decode(z)||^2 + beta * KL(q(z | x) || N(0, I)) ] / D`` with
    ``z = mean + exp(logvar / 2) * eps`` reparametrized (Kingma & Welling 2014) and ``D`` the number of
    values of one image. ``beta = 1`` gives the negative ELBO of a Gaussian decoder of variance 1/2 (up to a
    constant); the small default is the KL weight of the latent diffusion autoencoders (Rombach et al. 2022),
    which keeps the latent close to a deterministic code of the image.
    Returns ``(loss, {"reconstruction": ..., "kl": ...})``, both per dimension.
    """
    x_hat, posterior = model.apply(params, x, key)
    dims = x[0].size
    reconstruction = jnp.mean(jnp.sum(jnp.square(x - x_hat), axis=(1, 2, 3))) / dims
    kl = jnp.mean(posterior.kl()) / dims
    return reconstruction + beta * kl, {"reconstruction": reconstruction, "kl": kl}
