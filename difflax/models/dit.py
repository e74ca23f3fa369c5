"""Diffusion Transformer (DiT) of Peebles & Xie 2023, "Scalable diffusion models with transformers".

The image (or latent) is cut into ``p x p`` patches, linearly embedded and given a fixed
2-D sine-cosine position embedding; a stack of transformer blocks is conditioned on the
timestep plus class embedding through adaptive layer norm with zero-initialized gates
(adaLN-Zero, sec. 3.2), so at initialization every block is the identity and the network
outputs zero; a final adaLN layer and a linear map return the patches.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from difflax.models.embeddings import ConditionEmbedding
from difflax.models.layers import FEATURES, SelfAttention, maybe_remat, with_self_condition

Array = jax.Array
Dtype = Any

__all__ = ["DIT_CONFIGS", "DiT", "DiTBlock", "FinalLayer", "dit", "dit_config", "sincos_axis_embedding",
           "sincos_position_embedding"]

# (depth, hidden_size, num_heads) of Peebles & Xie 2023, table 1.
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_CONFIGS = {
    f"{size}/{patch}": dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
    for size, (depth, hidden, heads) in _SIZES.items()
    for patch in (2, 4, 8)
}

_XAVIER = nn.initializers.xavier_uniform()
_ZEROS = nn.initializers.zeros_init()


def dit_config(name: str) -> dict:
    """``dict(depth, hidden_size, num_heads, patch_size)`` of a standard DiT, e.g. ``"XL/2"`` or ``"DiT-S/4"``."""
    key = name.removeprefix("DiT-")
    if key not in DIT_CONFIGS:
        raise ValueError(f"Unknown DiT config name {name!r}; known configs: {', '.join(DIT_CONFIGS)}.")
    return dict(DIT_CONFIGS[key])


def dit(name: str, **kwargs) -> DiT:
    """A :class:`DiT` of a standard size, e.g. ``dit("XL/2", num_classes=1000)``; ``kwargs`` override."""
    return DiT(**{**dit_config(name), **kwargs})


def sincos_axis_embedding(pos: np.ndarray, dim: int) -> np.ndarray:
    """``(len(pos), dim)`` embedding ``[sin(pos w_k), cos(pos w_k)]`` with ``w_k = 10000^(-k / (dim / 2))``."""
    omega = 1.0 / 10_000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim // 2))
    args = np.asarray(pos, np.float64).reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(args), np.cos(args)], axis=1)


def sincos_position_embedding(height: int, width: int, dim: int) -> np.ndarray:
    """Fixed 2-D sine-cosine position embedding ``(height * width, dim)`` (MAE, He et al. 2022).

    Half of the channels encode the row, half the column, each with
    :func:`sincos_axis_embedding` of ``dim / 2`` channels.
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs hidden_size divisible by 4; got {dim}.")
    rows, cols = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    return np.concatenate([sincos_axis_embedding(rows, dim // 2), sincos_axis_embedding(cols, dim // 2)],
                          axis=1).astype(np.float32)


def _adaln_zero(c: Array, chunks: int, features: int, kw: dict) -> list[Array]:
    """``chunks`` float32 vectors of width ``features`` from one zero-initialized ``Dense(SiLU(c))``."""
    mod = nn.Dense(chunks * features, kernel_init=_ZEROS, **kw, name="adaLN_modulation")(nn.silu(c))
    return jnp.split(mod.astype(jnp.float32), chunks, axis=-1)


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def _layer_norm(name: str) -> nn.LayerNorm:
    # No affine parameters (adaLN supplies them); float32 statistics and output.
    return nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=jnp.float32, name=name)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (Peebles & Xie 2023, fig. 3).

    ``x + g1 Attn(LN(x) (1 + s1) + b1)``, then ``x + g2 MLP(LN(x) (1 + s2) + b2)``; the six
    vectors are a zero-initialized linear map of ``SiLU(c)``, so the block starts as the identity.
    """

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shift1, scale1, gate1, shift2, scale2, gate2 = _adaln_zero(c, 6, self.hidden_size, kw)
        h = _modulate(_layer_norm("norm1")(x), shift1, scale1)
        h = SelfAttention(self.num_heads, kernel_init=_XAVIER, **kw, name="attention")(h)
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
        x = x + gate1[:, None, :] * h
        h = _modulate(_layer_norm("norm2")(x), shift2, scale2)
        h = nn.Dense(int(self.hidden_size * self.mlp_ratio), kernel_init=_XAVIER, **kw, name="mlp_in")(h)
        h = nn.Dense(self.hidden_size, kernel_init=_XAVIER, **kw, name="mlp_out")(nn.gelu(h, approximate=True))
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
        return x + gate2[:, None, :] * h


class FinalLayer(nn.Module):
    """``Linear(LN(x) (1 + s) + b)`` to ``p * p * out_channels`` per token; both maps zero-initialized."""

    hidden_size: int
    patch_size: int
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shift, scale = _adaln_zero(c, 2, self.hidden_size, kw)
        x = _modulate(_layer_norm("norm")(x), shift, scale)
        features = self.patch_size**2 * self.out_channels
        return nn.Dense(features, kernel_init=_ZEROS, **kw, name="linear")(x)


class DiT(nn.Module):
    """Diffusion Transformer: ``DiT(...)(x, t, y=None, *, train=False, self_cond=None)`` with ``x`` NHWC.

    ``x`` of shape ``(batch, H, W, C)`` with ``H`` and ``W`` divisible by ``patch_size`` becomes
    ``(H / p) (W / p)`` tokens of width ``hidden_size``; ``depth`` :class:`DiTBlock` with
    ``num_heads`` heads follow. The conditioning vector is the sinusoidal (``"positional"``)
    or ``"fourier"`` embedding of ``t`` through an MLP, plus the class embedding when
    ``num_classes`` is set (``y=None`` or ``y == num_classes``: the null class of
    classifier-free guidance). The output has ``out_channels`` (default ``C``) channels, so
    :func:`difflax.as_denoiser` takes it as it is; ``learn_sigma=True`` (the paper's models)
    doubles them with a learned-variance half (Nichol & Dhariwal 2021) after the prediction,
    which :func:`difflax.train.builders.make_apply` splits off.

    Standard sizes: :func:`dit` / :func:`dit_config` (``"S/2"`` ... ``"XL/8"``). Initialization
    follows the paper: Xavier-uniform linear layers, ``N(0, 0.02^2)`` embeddings, zero adaLN
    and output layers. ``dtype`` is the compute dtype; parameters are ``param_dtype``; layer
    norms, the residual stream, the conditioning vector and the output are float32.
    ``remat`` rematerializes each block (``True``, or a policy name of
    :data:`~difflax.models.layers.REMAT_POLICIES`); ``self_condition`` concatenates ``self_cond``
    (zeros when ``None``) to the input channels (Chen et al. 2022). ``dropout`` (after
    attention and MLP, default 0 as in the paper) is active only with ``train=True``.

    ``guidance_embedding=True`` adds the guidance strength ``w`` to the conditioning (guidance
    distillation, Meng et al. 2023; see :class:`~difflax.models.embeddings.ConditionEmbedding`).
    """

    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int | None = 1000
    learn_sigma: bool = False
    out_channels: int | None = None
    dropout: float = 0.0
    embedding: str = "positional"
    frequency_dim: int = 256
    max_period: float = 10_000.0
    fourier_scale: float = 16.0
    self_condition: bool = False
    guidance_embedding: bool = False
    remat: bool | str = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Array, t: Array, y: Array | None = None, *, train: bool = False, self_cond=None, w=None
    ) -> Array:
        if x.ndim != 4:
            raise ValueError(f"x must be NHWC (4 axes); got shape {x.shape}.")
        batch, height, width, channels = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} must be divisible by patch_size={p}.")
        out_channels = (self.out_channels or channels) * (2 if self.learn_sigma else 1)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = with_self_condition(x, self_cond, self.self_condition)

        grid_h, grid_w = height // p, width // p
        patches = x.reshape(batch, grid_h, p, grid_w, p, x.shape[-1]).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, grid_h * grid_w, p * p * x.shape[-1])
        h = nn.Dense(self.hidden_size, kernel_init=_XAVIER, **kw, name="patch_embed")(patches)
        h = h.astype(jnp.float32) + sincos_position_embedding(grid_h, grid_w, self.hidden_size)[None]

        c = ConditionEmbedding.of(self, self.hidden_size, self.frequency_dim)(t, y, batch, w)

        block = maybe_remat(DiTBlock, self.remat)
        for i in range(self.depth):
            h = block(
                self.hidden_size, self.num_heads, self.mlp_ratio, self.dropout, not train, **kw, name=f"block{i}"
            )(h, c)
            if i == (self.depth - 1) // 2:
                self.sow("intermediates", FEATURES, h)
        h = FinalLayer(self.hidden_size, p, out_channels, **kw, name="final_layer")(h, c)

        h = h.reshape(batch, grid_h, grid_w, p, p, out_channels).transpose(0, 1, 3, 2, 4, 5)
        return h.reshape(batch, height, width, out_channels).astype(jnp.float32)
