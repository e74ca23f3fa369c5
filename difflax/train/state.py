"""The training state: parameters, their EMA, optimizer state, step and RNG, as one pytree."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

__all__ = ["TrainState", "ema_decay", "update_ema"]


@struct.dataclass
class TrainState:
    """Everything a training step reads and writes.

    ``rng`` holds raw key data (``jax.random.key_data``) so that checkpoints store a plain
    ``uint32`` array; :meth:`key` wraps it back.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=jax.tree.map(jnp.copy, params),
            opt_state=tx.init(params),
            rng=jax.random.key_data(key),
        )

    def key(self) -> jax.Array:
        return jax.random.wrap_key_data(self.rng)


def ema_decay(step, decay: float, warmup: bool = True):
    """EMA decay at ``step``; with ``warmup`` it is ``min(decay, (1 + step) / (10 + step))``.

    The warm-up keeps the average from being dominated by the initialization early in
    training (as in the TensorFlow ``ExponentialMovingAverage`` with ``num_updates``,
    used by the DDPM and score_sde code).
    """
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step)) if warmup else jnp.asarray(decay, jnp.float32)


def update_ema(ema_params, params, decay):
    """``ema <- decay * ema + (1 - decay) * params``."""
    return optax.incremental_update(params, ema_params, 1.0 - decay)
