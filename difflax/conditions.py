"""Conditions of conditional denoisers: null conditions, batching, and condition dropout.

A *conditional denoiser* has the signature ``denoise_cond(x_t, t, y) -> x0_hat``; the
condition ``y`` is any pytree whose leaves carry the batch axis (class ids of shape
``(batch,)``, text embeddings of shape ``(batch, tokens, dim)``, ...). The *null
condition* stands for "no condition": a null label id (e.g. the extra class
``num_classes`` of :class:`difflax.models.ClassEmbedding`) or a null embedding.
Classifier-free guidance (Ho & Salimans 2021) trains one network on both by dropping
conditions to the null condition (:func:`drop_condition`, training) and evaluates
both in one batched call (:func:`call_branches`, sampling); :func:`null_like` and
:func:`batch_condition` give the null condition and the condition the batch's shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from difflax.checks import check_in_range

Array = jax.Array
ConditionalDenoiser = Callable[[Array, Array, Any], Array]

__all__ = ["ConditionalDenoiser", "batch_condition", "call_branches", "drop_condition", "null_like"]


def batch_condition(y, batch: int):
    """Give every leaf of ``y`` the leading batch axis ``batch`` (scalars and size-1 axes broadcast)."""

    def fix(leaf):
        leaf = jnp.asarray(leaf)
        if leaf.ndim == 0:
            return jnp.broadcast_to(leaf, (batch,))
        if leaf.shape[0] == batch:
            return leaf
        if leaf.shape[0] == 1:
            return jnp.broadcast_to(leaf, (batch, *leaf.shape[1:]))
        raise ValueError(
            f"y: every leaf of the condition must be a scalar or have the batch size {batch} (or 1) as its "
            f"leading axis; got a leaf of shape {leaf.shape}."
        )

    return jax.tree.map(fix, y)


def null_like(null, y):
    """The null condition in the shape and dtype of ``y``.

    ``null`` is a null label id (a scalar, broadcast to every label), a null embedding of
    one example's shape (e.g. ``(tokens, dim)``, broadcast over the batch), an array of
    ``y``'s full shape, or a pytree of these with ``y``'s structure.
    """
    y_leaves, treedef = jax.tree.flatten(y)
    null_leaves, null_def = jax.tree.flatten(null)
    if null_def == treedef:
        pairs = zip(null_leaves, y_leaves, strict=True)
    elif len(null_leaves) == 1:
        pairs = ((null_leaves[0], leaf) for leaf in y_leaves)
    else:
        raise ValueError(
            f"null must be a single array (label id or embedding) or a pytree with the structure of y; "
            f"got structure {null_def} for y of structure {treedef}."
        )

    def fix(n, leaf):
        leaf = jnp.asarray(leaf)
        n = jnp.asarray(n, dtype=leaf.dtype)
        if n.shape == leaf.shape or n.shape == leaf.shape[1:] or n.ndim == 0:
            return jnp.broadcast_to(n, leaf.shape)
        raise ValueError(
            f"null has shape {n.shape}, which fits neither one example {leaf.shape[1:]} nor the batch "
            f"{leaf.shape} of the condition y."
        )

    return jax.tree.unflatten(treedef, [fix(n, leaf) for n, leaf in pairs])


def call_branches(denoise_cond: ConditionalDenoiser, x: Array, t, conds: Sequence) -> list[Array]:
    """``[denoise_cond(x, t, y) for y in conds]``, evaluated in ONE call of batch ``len(conds) * B``.

    ``x`` has batch ``B``, ``t`` is a scalar or ``(B,)``, and every condition in ``conds``
    already has the batch axis ``B`` (:func:`batch_condition`).
    """
    n, batch = len(conds), x.shape[0]
    t_b = jnp.broadcast_to(jnp.asarray(t, dtype=jnp.result_type(t, float)), (batch,))
    ys = jax.tree.map(lambda *leaves: jnp.concatenate(leaves, axis=0), *conds)
    out = denoise_cond(jnp.concatenate([x] * n, axis=0), jnp.concatenate([t_b] * n), ys)
    if out.shape != (n * batch, *x.shape[1:]):
        raise ValueError(
            f"denoise_cond must return an array of the shape of its input {(n * batch, *x.shape[1:])}; got {out.shape}."
        )
    return jnp.split(out, n, axis=0)


def drop_condition(key: Array, y, p_uncond, null, *, return_mask: bool = False):
    """Condition dropout for classifier-free guidance training (Ho & Salimans 2021, alg. 1).

    Each example's condition is replaced by the null condition with probability
    ``p_uncond`` (the paper: 0.1 or 0.2), so one network learns both ``D(x_t, t, y)`` and
    ``D(x_t, t, null)``. ``y`` is a pytree whose leaves carry the batch axis (labels
    ``(batch,)``, embeddings ``(batch, ...)``); ``null`` is a null label id or a null
    embedding, broadcast as in :func:`null_like`. ``p_uncond`` may be traced. With
    ``return_mask`` also returns the boolean ``(batch,)`` mask of dropped examples.
    """
    leaves = jax.tree.leaves(y)
    if not leaves or any(jnp.ndim(leaf) < 1 for leaf in leaves):
        raise ValueError("y must be a pytree of arrays with a leading batch axis.")
    batch = jnp.shape(leaves[0])[0]
    if any(jnp.shape(leaf)[0] != batch for leaf in leaves):
        raise ValueError(f"y: every leaf must have the same batch size; got {[jnp.shape(v) for v in leaves]}.")
    check_in_range(p_uncond, 0.0, 1.0, "p_uncond")
    drop = jax.random.uniform(key, (batch,)) < p_uncond
    nulls = null_like(null, y)
    out = jax.tree.map(lambda a, n: jnp.where(drop.reshape((batch,) + (1,) * (jnp.ndim(a) - 1)), n, a), y, nulls)
    return (out, drop) if return_mask else out
