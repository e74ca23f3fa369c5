"""Residual MLP for low-dimensional data (2-D toys, tabular features).

Pre-norm residual blocks (He et al. 2016, "Identity mappings in deep residual networks")
with the scale-shift noise conditioning of ADM (Dhariwal & Nichol 2021); the tabular
diffusion models of Kotelnikov et al. 2023 (TabDDPM) and Gorishniy et al. 2021 use the
same residual MLP backbone.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from difflax.models.embeddings import ConditionEmbedding
from difflax.models.layers import FEATURES, maybe_remat, with_self_condition

Array = jax.Array
Dtype = Any

__all__ = ["MLPResBlock", "MLPResNet"]


class MLPResBlock(nn.Module):
    """``x + Dense0(dropout(SiLU(Dense(SiLU(LN(x) (1 + s) + b)))))``; ``Dense0`` zero-initialized."""

    features: int
    expansion: int = 2
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        film = nn.Dense(2 * self.features, **kw, name="film")(nn.silu(c))
        scale, shift = jnp.split(film.astype(jnp.float32), 2, axis=-1)
        h = nn.LayerNorm(dtype=jnp.float32, param_dtype=self.param_dtype, name="norm")(x) * (1.0 + scale) + shift
        h = nn.Dense(self.expansion * self.features, **kw, name="dense1")(nn.silu(h))
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(nn.silu(h))
        h = nn.Dense(self.features, kernel_init=nn.initializers.zeros_init(), **kw, name="dense2")(h)
        return x + h.astype(jnp.float32)


class MLPResNet(nn.Module):
    """Residual MLP: ``MLPResNet(...)(x, t, y=None, *, train=False, self_cond=None)``.

    ``x`` has shape ``(batch, ...)``; the features are flattened, mapped to ``features``
    channels, passed through ``num_blocks`` :class:`MLPResBlock` conditioned on the
    embedding of ``t`` (plus the class of ``y`` when ``num_classes`` is set; ``y=None`` is the
    null class) and mapped back by a zero-initialized layer to the shape of ``x`` (or to
    ``out_features`` per example). Conditioning, dtypes, ``self_condition`` and ``remat``
    work as in :class:`~difflax.models.unet.UNet`.

    ``guidance_embedding=True`` adds an extra scalar ``w`` to the conditioning: the guidance strength
    (guidance distillation, Meng et al. 2023), the interval ``t - r`` (MeanFlow) or the step size ``d``
    (shortcut models); see :class:`~difflax.models.embeddings.ConditionEmbedding`.
    """

    features: int = 256
    num_blocks: int = 4
    expansion: int = 2
    dropout: float = 0.0
    num_classes: int | None = None
    embedding: str = "positional"
    frequency_dim: int = 64
    max_period: float = 10_000.0
    fourier_scale: float = 16.0
    out_features: int | None = None
    self_condition: bool = False
    guidance_embedding: bool = False
    remat: bool | str = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Array, t: Array, y: Array | None = None, *, train: bool = False, self_cond=None, w=None
    ) -> Array:
        if x.ndim < 2:
            raise ValueError(f"x must have a batch axis and at least one feature axis; got shape {x.shape}.")
        batch = x.shape[0]
        out_shape = x.shape if self.out_features is None else (batch, self.out_features)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = with_self_condition(x, self_cond, self.self_condition).reshape(batch, -1)
        c = ConditionEmbedding.of(self, self.features, self.frequency_dim)(t, y, batch, w)
        h = nn.Dense(self.features, **kw, name="dense_in")(x).astype(jnp.float32)
        block = maybe_remat(MLPResBlock, self.remat)
        for i in range(self.num_blocks):
            h = block(self.features, self.expansion, self.dropout, not train, **kw, name=f"block{i}")(h, c)
        self.sow("intermediates", FEATURES, h)
        h = nn.silu(nn.LayerNorm(dtype=jnp.float32, param_dtype=self.param_dtype, name="norm_out")(h))
        h = nn.Dense(math.prod(out_shape[1:]), kernel_init=nn.initializers.zeros_init(), **kw, name="dense_out")(h)
        return h.reshape(out_shape).astype(jnp.float32)
