"""Noise-level and class embeddings shared by every model in :mod:`difflax.models`.

* :func:`sinusoidal_embedding`: the transformer position encoding applied to the noise
  level (Vaswani et al. 2017; used for timesteps by Ho et al. 2020, Dhariwal & Nichol
  2021 and Peebles & Xie 2023).
* :func:`fourier_features`: random Fourier features of the noise level with a fixed
  Gaussian frequency vector (Tancik et al. 2020; used on ``log sigma`` by Song et al. 2021).
* :class:`ClassEmbedding`: a learned table with one extra row, the *null class*
  ``num_classes``, that stands for "no label" in classifier-free guidance (Ho & Salimans 2022).
* :class:`ConditionEmbedding`: noise embedding -> MLP, plus the class embedding; the
  conditioning vector every model's blocks read.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from difflax.conditions import batch_condition

Array = jax.Array
Dtype = Any

NOISE_EMBEDDINGS = ("positional", "fourier")
_NORMAL_002 = nn.initializers.normal(0.02)

__all__ = [
    "NOISE_EMBEDDINGS",
    "ClassEmbedding",
    "ConditionEmbedding",
    "fourier_features",
    "sinusoidal_embedding",
]


def _per_example(t, batch: int) -> Array:
    """``t`` of shape ``()`` or ``(batch,)`` as a float32 ``(batch,)`` vector."""
    t = jnp.asarray(t, dtype=jnp.float32)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
        raise ValueError(f"t must be a scalar or have shape ({batch},) matching the batch of x; got shape {t.shape}.")
    return jnp.broadcast_to(t.reshape(-1), (batch,))


def sinusoidal_embedding(t: Array, dim: int, max_period: float = 10_000.0) -> Array:
    """``[cos(t f_k), sin(t f_k)]`` with ``f_k = max_period^(-k / (dim / 2))``, ``k < dim / 2``.

    ``t`` has shape ``(batch,)``; the result ``(batch, dim)`` in float32 (an odd ``dim`` gets a
    trailing zero column). Periods range from ``2 pi`` to ``2 pi max_period``, so ``t`` should
    span a range comparable to ``max_period`` (DDPM step indices 0..999 do; pass ``1000 t``
    for a time in [0, 1]).
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def fourier_features(t: Array, dim: int, scale: float = 16.0, seed: int = 0) -> Array:
    """Gaussian Fourier features ``[sin(2 pi t w), cos(2 pi t w)]``, ``w ~ N(0, scale^2)``.

    The ``dim // 2`` frequencies are drawn once from ``seed`` and are constants, not
    parameters (Song et al. 2021 keep them fixed with a stop-gradient). ``t`` has shape
    ``(batch,)``, typically ``log sigma``; the result is float32 ``(batch, dim)``.
    """
    if dim % 2:
        raise ValueError(f"Fourier features need an even dim; got {dim}.")
    w = scale * jax.random.normal(jax.random.key(seed), (dim // 2,), jnp.float32)
    args = 2.0 * math.pi * jnp.asarray(t, jnp.float32)[:, None] * w[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class ClassEmbedding(nn.Module):
    """Learned class embedding with a null class (index ``num_classes``) for unconditional use.

    ``y=None`` embeds the null class for every example. The table is initialized
    ``N(0, 0.02^2)`` as in DiT (Peebles & Xie 2023).
    """

    num_classes: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, y: Array | None, batch: int) -> Array:
        y = batch_condition(self.num_classes if y is None else jnp.ravel(y), batch).astype(jnp.int32)
        table = nn.Embed(
            self.num_classes + 1,
            self.features,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.initializers.normal(0.02),
            name="table",
        )
        return table(y)


class ConditionEmbedding(nn.Module):
    """Conditioning vector ``c = MLP(embed(t)) [+ ClassEmbedding(y)]`` of shape ``(batch, features)``.

    ``embedding="positional"`` uses :func:`sinusoidal_embedding` (DDPM, ADM, DiT),
    ``"fourier"`` uses :func:`fourier_features` (NCSN++ / DDPM++ of Song et al. 2021).
    The MLP is ``Dense(features) -> SiLU -> Dense(features)`` as in ADM and DiT. With
    ``num_classes`` set, ``y`` (int labels, ``None`` or the null class ``num_classes`` for
    unconditional) adds a :class:`ClassEmbedding`. With ``guidance=True`` an extra per-example
    scalar ``w`` (``(batch,)``, ``None`` meaning 0) adds ``MLP(fourier(w))`` whose last layer
    starts at zero, so a student initialized from its teacher starts as the teacher for every
    ``w``. ``w`` is the guidance strength of guidance distillation (Meng et al. 2023 embed it like
    the noise level), the interval ``t - r`` of MeanFlow's average velocity (Geng et al. 2025) or
    the step size ``d`` of shortcut models (Frans et al. 2024). Models without it keep their
    parameter trees. The result is float32.
    """

    features: int
    num_classes: int | None = None
    embedding: str = "positional"
    frequency_dim: int = 256
    max_period: float = 10_000.0
    fourier_scale: float = 16.0
    guidance: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @classmethod
    def of(cls, model: nn.Module, features: int, frequency_dim: int) -> ConditionEmbedding:
        """The ``"condition"`` submodule of a network, configured by the network's fields.

        ``model`` has ``num_classes``, ``embedding``, ``max_period``, ``fourier_scale``,
        ``guidance_embedding``, ``dtype`` and ``param_dtype`` (as :class:`~difflax.models.UNet`,
        :class:`~difflax.models.DiT` and :class:`~difflax.models.MLPResNet`); call this inside
        the network's compact ``__call__``, which makes it the submodule's parent.
        """
        return cls(
            features,
            model.num_classes,
            model.embedding,
            frequency_dim=frequency_dim,
            max_period=model.max_period,
            fourier_scale=model.fourier_scale,
            guidance=model.guidance_embedding,
            dtype=model.dtype,
            param_dtype=model.param_dtype,
            name="condition",
        )

    @nn.compact
    def __call__(self, t: Array, y: Array | None, batch: int, w: Array | None = None) -> Array:
        if self.embedding not in NOISE_EMBEDDINGS:
            raise ValueError(
                f"Unknown embedding {self.embedding!r}; expected one of {', '.join(map(repr, NOISE_EMBEDDINGS))}."
            )
        if y is not None and self.num_classes is None:
            raise ValueError("y was given but the model is unconditional (num_classes=None).")
        t = _per_example(t, batch)
        if self.embedding == "positional":
            freq = sinusoidal_embedding(t, self.frequency_dim, self.max_period)
        else:
            freq = fourier_features(t, self.frequency_dim, self.fourier_scale)
        dense = lambda name, init=_NORMAL_002: nn.Dense(
            self.features,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=init,
            name=name,
        )
        c = dense("mlp_in")(freq)
        c = dense("mlp_out")(nn.silu(c)).astype(jnp.float32)
        if self.num_classes is not None:
            c = c + ClassEmbedding(
                self.num_classes, self.features, self.dtype, self.param_dtype, name="class_embedding"
            )(y, batch).astype(jnp.float32)
        if self.guidance:
            w = _per_example(0.0 if w is None else w, batch)
            g = dense("guidance_in")(fourier_features(w, self.frequency_dim, scale=1.0, seed=1))
            c = c + dense("guidance_out", nn.initializers.zeros_init())(nn.silu(g)).astype(jnp.float32)
        elif w is not None:
            raise ValueError("w (the extra scalar condition) was given but the model has guidance_embedding=False.")
        return c
