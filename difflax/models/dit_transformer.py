"""Diffusion Transformer (Peebles & Xie 2023) in the tensor layout of diffusers' ``DiTTransformer2DModel``.

This is the network of the published ``DiT-XL-2-256`` checkpoint as diffusers lays it out,
written in Flax for NHWC latents so that it converts exactly (:mod:`difflax.hub.dit`). It
computes what difflax's :class:`~difflax.models.DiT` computes except for details that change
the output: the 2-D sine-cosine position embedding encodes the column (``w``) in its first
half and the row in its second (difflax's puts rows first), the timestep sinusoid has
``freq_shift = 1`` (frequencies ``10000^(-k / 127)``), the layer norm before the MLP has
``eps = norm_eps`` (``1e-5``; ``1e-6`` before attention and at the output), query / key / value
are separate maps, and every block holds its own timestep + label embedding (the last layer
reads block 0's). A checkpoint converted from the paper's code holds ``num_layers`` equal
copies of the one embedding; ``tie_embeddings=True`` keeps one (``transformer_blocks.0``'s),
which is the paper's parameter count.

Module names are the checkpoint's: a parameter's path joined by ``"."`` is the tensor's name
(``kernel`` / ``embedding`` for ``weight``), e.g. ``transformer_blocks.3.attn1.to_q.kernel``.

Time: the network reads the process time ``t`` in ``[0, 1]`` and embeds the step index
``n = time_scale * t + time_shift``; the defaults give the DDPM step ``n = 1000 t - 1`` of
:class:`~difflax.processes.DiscreteVP` with 1000 steps.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from difflax.models.dit import sincos_axis_embedding
from difflax.models.layers import with_self_condition
from difflax.models.unet2d import step_index, timestep_embedding

Array = jax.Array

__all__ = ["DiTBlockLayout", "DiTTransformer2D", "TimestepLabelEmbedding", "dit_position_embedding"]

_ACTIVATIONS = {"gelu-approximate": True, "gelu": False}  # -> tanh approximation of the MLP's GELU


def dit_position_embedding(grid_h: int, grid_w: int, dim: int, base_size: int) -> np.ndarray:
    """2-D sine-cosine embedding ``(grid_h * grid_w, dim)`` of DiT's patch grid, column first.

    Positions along an axis of ``g`` patches are ``i base_size / g`` (integers at the trained
    size ``base_size``); each axis takes ``dim / 2`` channels of
    :func:`~difflax.models.dit.sincos_axis_embedding`; the column coordinate fills the first half.
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs a width divisible by 4; got {dim}.")
    rows = np.arange(grid_h, dtype=np.float32) / np.float32(grid_h / base_size)
    cols = np.arange(grid_w, dtype=np.float32) / np.float32(grid_w / base_size)
    rows, cols = np.meshgrid(rows.astype(np.float64), cols.astype(np.float64), indexing="ij")
    return np.concatenate([sincos_axis_embedding(cols, dim // 2), sincos_axis_embedding(rows, dim // 2)],
                          axis=1).astype(np.float32)


class TimestepLabelEmbedding(nn.Module):
    """``MLP(sinusoid_256(n)) + table[y]``; the table has ``num_classes + 1`` rows, the last the null class."""

    features: int
    num_classes: int

    @nn.compact
    def __call__(self, n: Array, y: Array) -> Array:
        h = timestep_embedding(n, 256, flip_sin_to_cos=True, freq_shift=1)
        h = nn.Dense(self.features, name="timestep_embedder.linear_1")(h)
        h = nn.Dense(self.features, name="timestep_embedder.linear_2")(nn.silu(h))
        return h + nn.Embed(self.num_classes + 1, self.features, name="class_embedder.embedding_table")(y)


def _layer_norm(eps: float) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, use_scale=False, use_bias=False, use_fast_variance=False)


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


class DiTBlockLayout(nn.Module):
    """``x + g1 Attn(LN(x) (1 + s1) + b1)``, then ``x + g2 MLP(LN'(x) (1 + s2) + b2)`` (adaLN-Zero).

    The six vectors are ``norm1.linear(SiLU(c))``; ``c`` is the block's own
    :class:`TimestepLabelEmbedding` (``norm1.emb``), or the one passed in when ``c`` is given.
    """

    num_heads: int
    head_dim: int
    num_classes: int
    norm_eps: float
    attention_bias: bool
    approximate_gelu: bool
    dropout: float = 0.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array, n: Array, y: Array, c: Array | None) -> tuple[Array, Array]:
        batch, length, width = x.shape
        if c is None:
            c = TimestepLabelEmbedding(width, self.num_classes, name="norm1.emb")(n, y)
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(
            nn.Dense(6 * width, name="norm1.linear")(nn.silu(c)), 6, axis=-1
        )
        h = _modulate(_layer_norm(1e-6)(x), shift1, scale1)
        q, k, v = (
            nn.Dense(self.num_heads * self.head_dim, use_bias=self.attention_bias, name=f"attn1.{name}")(h)
            .reshape(batch, length, self.num_heads, self.head_dim)
            for name in ("to_q", "to_k", "to_v")
        )
        h = jax.nn.dot_product_attention(q, k, v).reshape(batch, length, self.num_heads * self.head_dim)
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(nn.Dense(width, name="attn1.to_out.0")(h))
        x = x + gate1[:, None, :] * h
        h = _modulate(_layer_norm(self.norm_eps)(x), shift2, scale2)
        h = nn.gelu(nn.Dense(4 * width, name="ff.net.0.proj")(h), approximate=self.approximate_gelu)
        h = nn.Dense(width, name="ff.net.2")(nn.Dropout(self.dropout, deterministic=self.deterministic)(h))
        return x + gate2[:, None, :] * h, c


class DiTTransformer2D(nn.Module):
    """DiT in the ``DiTTransformer2DModel`` layout: ``DiTTransformer2D(...)(x, t, y=None, *, train=False)``.

    Fields carry the checkpoint config's names and defaults (DiT-XL/2 for 256px images:
    32x32x4 latents). ``x`` ``(batch, H, W, in_channels)`` is cut into ``patch_size`` patches
    (a strided convolution, ``pos_embed.proj``) plus :func:`dit_position_embedding` with
    ``base_size = sample_size / patch_size``; ``num_layers`` :class:`DiTBlockLayout` of
    ``num_attention_heads`` heads of width ``attention_head_dim`` follow, then
    ``proj_out_2(LN(x) (1 + s) + b)`` with ``(b, s) = proj_out_1(SiLU(c))``. Labels ``y`` index
    ``num_embeds_ada_norm`` classes; ``y=None`` or ``y == num_embeds_ada_norm`` is the null
    class of classifier-free guidance. ``out_channels`` (default ``in_channels``) is ``2 C`` for
    the learned-sigma checkpoints: the first ``C`` channels are the noise prediction, the rest
    the variance interpolation of Nichol & Dhariwal 2021.
    """

    num_attention_heads: int = 16
    attention_head_dim: int = 72
    out_channels: int | None = None
    num_layers: int = 28
    sample_size: int = 32
    patch_size: int = 2
    num_embeds_ada_norm: int = 1000
    norm_eps: float = 1e-5
    attention_bias: bool = True
    activation_fn: str = "gelu-approximate"
    dropout: float = 0.0
    tie_embeddings: bool = False
    time_scale: float = 1000.0
    time_shift: float = -1.0

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None = None, *, train: bool = False, self_cond=None) -> Array:
        if x.ndim != 4:
            raise ValueError(f"x must be NHWC (4 axes); got shape {x.shape}.")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be at least 1 (the output layer reads block 0); got {self.num_layers}.")
        if self.activation_fn not in _ACTIVATIONS:
            raise ValueError(f"activation_fn must be one of {', '.join(_ACTIVATIONS)}; got {self.activation_fn!r}.")
        x = with_self_condition(jnp.asarray(x, jnp.float32), self_cond, False)
        batch, height, width, _ = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} must be divisible by patch_size={p}.")
        hidden = self.num_attention_heads * self.attention_head_dim
        out_channels = self.out_channels or x.shape[-1]
        grid_h, grid_w = height // p, width // p

        n = step_index(t, batch, self.time_scale, self.time_shift)
        y = jnp.full((batch,), self.num_embeds_ada_norm) if y is None else jnp.broadcast_to(jnp.ravel(y), (batch,))
        h = nn.Conv(hidden, (p, p), strides=p, padding="VALID", name="pos_embed.proj")(x)
        pos = dit_position_embedding(grid_h, grid_w, hidden, self.sample_size // p)
        h = h.reshape(batch, grid_h * grid_w, hidden) + pos[None]

        shared = None
        if self.tie_embeddings:
            embed = TimestepLabelEmbedding(hidden, self.num_embeds_ada_norm, name="transformer_blocks.0.norm1.emb")
            shared = embed(n, y)
        for i in range(self.num_layers):
            h, c = DiTBlockLayout(self.num_attention_heads, self.attention_head_dim, self.num_embeds_ada_norm,
                                  self.norm_eps, self.attention_bias, _ACTIVATIONS[self.activation_fn],
                                  self.dropout, not train, name=f"transformer_blocks.{i}")(h, n, y, shared)
            if i == 0:
                c_final = c  # the output layer reads block 0's conditioning

        shift, scale = jnp.split(nn.Dense(2 * hidden, name="proj_out_1")(nn.silu(c_final)), 2, axis=-1)
        h = nn.Dense(p * p * out_channels, name="proj_out_2")(_modulate(_layer_norm(1e-6)(h), shift, scale))
        h = h.reshape(batch, grid_h, grid_w, p, p, out_channels).transpose(0, 1, 3, 2, 4, 5)
        return h.reshape(batch, height, width, out_channels)
