"""Building blocks shared by the U-Net, DiT and MLP: attention, self-conditioning, remat."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

__all__ = ["FEATURES", "FeatureCritic", "SelfAttention", "maybe_remat", "with_self_condition"]

# The name under which the U-Net, DiT and MLP sow their bottleneck features (``intermediates``
# collection): the U-Net's middle block, the DiT's middle block, the MLP's last block. They are
# read with ``mutable=["intermediates"]`` (:func:`difflax.train.builders.make_features`); a plain
# call does not store them.
FEATURES = "features"


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens ``(batch, length, channels)`` (Vaswani et al. 2017).

    One fused ``qkv`` projection and an output projection, both with bias. Logits and
    softmax are computed in float32 whatever ``dtype`` is (``jax.nn.dot_product_attention``).
    ``zero_init_out`` zero-initializes the output projection so a residual attention
    block starts as the identity (ADM, Dhariwal & Nichol 2021).
    """

    num_heads: int
    zero_init_out: bool = False
    kernel_init: Any = nn.initializers.lecun_normal()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        batch, length, channels = x.shape
        if channels % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide the attention width {channels}.")
        head_dim = channels // self.num_heads
        qkv = nn.Dense(
            3 * channels, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init, name="qkv"
        )(x)
        q, k, v = jnp.split(qkv.reshape(batch, length, 3 * self.num_heads, head_dim), 3, axis=2)
        h = jax.nn.dot_product_attention(q, k, v).reshape(batch, length, channels)
        out_init = nn.initializers.zeros_init() if self.zero_init_out else self.kernel_init
        return nn.Dense(channels, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=out_init, name="proj")(h)


def with_self_condition(x: Array, self_cond: Array | None, enabled: bool) -> Array:
    """Concatenate the previous ``x0`` estimate (zeros when absent) to ``x`` along the last axis.

    Self-conditioning of Chen et al. 2022 ("Analog bits"): the network sees its own
    earlier prediction as extra input channels.
    """
    if not enabled:
        if self_cond is not None:
            raise ValueError("self_cond was given but the model was built with self_condition=False.")
        return x
    if self_cond is None:
        self_cond = jnp.zeros_like(x)
    elif self_cond.shape != x.shape:
        raise ValueError(f"self_cond must have the shape of x {x.shape}; got {self_cond.shape}.")
    return jnp.concatenate([x, self_cond.astype(x.dtype)], axis=-1)


# What a rematerialized block keeps from its forward pass (jax.checkpoint_policies); the rest is recomputed.
REMAT_POLICIES = {
    "full": None,  # nothing: the whole block is recomputed (least memory)
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # matmul outputs: recompute the cheap ops
    "dots_all": jax.checkpoint_policies.dots_saveable,  # every dot, batched ones (attention) too
}


def maybe_remat(module_cls, remat: bool | str):
    """``module_cls`` rematerialized (activations recomputed in the backward pass) as ``remat`` says.

    ``False`` / ``None``: as it is; ``True`` or ``"full"``: every activation recomputed; ``"dots"`` /
    ``"dots_all"``: the policy of :data:`REMAT_POLICIES` (matrix products kept). Submodules built from the
    result must be named explicitly so the parameter tree is the same with and without rematerialization.
    """
    if remat is None or remat is False:
        return module_cls
    name = "full" if remat is True else remat
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat must be True, False or one of {', '.join(map(repr, REMAT_POLICIES))}; got {remat!r}.")
    policy = REMAT_POLICIES[name]
    return nn.remat(module_cls) if policy is None else nn.remat(module_cls, policy=policy)


class FeatureCritic(nn.Module):
    """A discriminator head on a network's sown :data:`FEATURES` (DMD2, Yin et al. 2024, section 4.3):
    one logit per example.

    Feature maps ``(batch, H, W, C)`` go through a strided 4x4 convolution, group norm and SiLU, then are
    averaged over space; token features ``(batch, N, C)`` are averaged over tokens; flat features are used
    as they are. A two-layer MLP (``width``, SiLU) gives the logit.
    """

    width: int = 64
    norm_groups: int = 8

    @nn.compact
    def __call__(self, h: Array) -> Array:
        h = h.astype(jnp.float32)
        if h.ndim == 4:
            h = nn.Conv(h.shape[-1], (4, 4), strides=(2, 2), padding="SAME", name="conv")(h)
            groups = self.norm_groups if h.shape[-1] % self.norm_groups == 0 else 1
            h = jnp.mean(nn.silu(nn.GroupNorm(groups, name="norm")(h)), axis=(1, 2))
        elif h.ndim == 3:
            h = jnp.mean(nn.LayerNorm(name="norm")(h), axis=1)
        elif h.ndim != 2:
            raise ValueError(f"features must have 2, 3 or 4 axes (flat, tokens or NHWC); got shape {h.shape}.")
        h = nn.silu(nn.Dense(self.width, name="dense0")(h))
        return nn.Dense(1, name="dense1")(h)[:, 0]
