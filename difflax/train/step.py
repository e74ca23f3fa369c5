"""The pure training step ``(state, batch) -> (state, metrics)``.

:func:`make_step` is one gradient step of any loss, written once for the recipes' trainer
(:func:`make_train_step`, the denoising loss of :func:`make_denoising_loss`) and for the
generic loop of the distillation methods (:func:`difflax.train.fit.fit`):

    g = grad_theta L(theta_k, batch_k, fold_in(key, k)),
    theta_{k+1} = theta_k + tx(g),
    ema_{k+1} = d_k ema_k + (1 - d_k) theta_{k+1}.

Given an ``axis_name`` (under ``jax.pmap``), replica ``i`` of ``n`` draws its noise from
``fold_in(fold_in(key, k), i)`` and every replica applies ``tx`` to the same averaged
gradient ``(1 / n) sum_i g_i``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from difflax import losses
from difflax.parametrization import as_denoiser
from difflax.train.builders import make_apply, sample_t
from difflax.train.optim import nonfinite_count, nonfinite_in_a_row
from difflax.train.state import TrainState, ema_decay, update_ema

__all__ = ["make_denoising_loss", "make_step", "make_train_step"]


def _check_axis_name(axis_name):
    if axis_name is not None and not isinstance(axis_name, str):
        raise TypeError(
            f"axis_name must be a str (the axis_name given to jax.pmap) or None; got {axis_name!r} "
            f"of type {type(axis_name).__name__}."
        )


def make_step(loss_fn: Callable, tx: optax.GradientTransformation, ema=0.0, *, axis_name: str | None = None):
    """``step(state, batch) -> (state, metrics)`` for ``loss_fn(params, batch, key, state) -> (loss, metrics)``.

    Step ``k`` uses the key ``fold_in(state.key(), k)``; ``state`` is passed to ``loss_fn``
    as it was before the update (its ``step``, and ``ema_params`` for methods whose target is
    an EMA of the student). ``ema`` is a decay, or a function ``ema(step) -> decay`` (e.g.
    the adaptive target decay of consistency training); a float decay is warmed up as in
    :func:`~difflax.train.state.ema_decay`, and ``0`` keeps no average (``ema_params`` is
    ``params``). Metrics: ``loss``, ``grad_norm`` (of the gradient given to ``tx``) and those
    of ``loss_fn``.

    Data parallelism comes in two forms. Under ``jax.jit`` over a device mesh (the recipes'
    :class:`~difflax.train.loop.Trainer`) the step sees one global batch, sharded by the
    compiler, and needs no ``axis_name``. Under ``jax.pmap(step, axis_name=axis_name)``, with
    one replica of the state and one shard of the batch per device, pass the same
    ``axis_name``: each device then

    * draws its own noise, from ``fold_in(fold_in(state.key(), k), axis_index(axis_name))``;
    * averages its gradient over the devices (``jax.lax.pmean``) *before* ``tx.update``, so
      that everything inside ``tx`` that reads the gradient (clipping by global norm,
      skipping non-finite updates, gradient accumulation) sees the averaged gradient, and
      every replica applies the same update and stays bit-identical to the others;
    * averages ``loss`` and the metrics of ``loss_fn`` over the devices. ``grad_norm`` is the
      norm of the averaged gradient (the one clipping compares with its threshold), the
      same on every device.

    For equal shards the averaged gradient is the gradient of the loss on the whole batch:
    the same expected update as the mesh path, with a different noise draw. Without
    ``axis_name`` (the default) nothing is averaged or folded in: under ``pmap`` each
    replica would train on its own shard alone.
    """
    _check_axis_name(axis_name)

    def step(state: TrainState, batch):
        key = jax.random.fold_in(state.key(), state.step)
        if axis_name is not None:
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key, state)
        if axis_name is not None:
            grads, loss, metrics = jax.lax.pmean((grads, loss, metrics), axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if callable(ema):
            ema_params = update_ema(state.ema_params, params, ema(state.step))
        elif ema:
            ema_params = update_ema(state.ema_params, params, ema_decay(state.step, ema))
        else:
            ema_params = params
        state = state.replace(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state)
        return state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}

    return step


def make_denoising_loss(model, process, config, num_classes: int | None = None) -> Callable:
    """The recipe's loss ``loss_fn(params, batch, key, state) -> (loss, {})``, as :func:`make_step` takes it.

    :func:`difflax.losses.denoising_loss` on the network's own output (``model.prediction``:
    eps, x0, v, velocity, or ``"edm"`` for the preconditioned ``F`` of Karras et al.,
    trained through its ``x0`` output) with the recipe's weighting and noise-level sampler,
    averaged over the batch. Labels are dropped to the null class with probability
    ``loss.p_uncond`` for classifier-free guidance.
    """
    prediction = config.model.prediction
    noise_scale = config.model.get("noise_scale", 1.0)
    conditional = bool(config.model.get("class_conditional", False))
    p_uncond = config.loss.get("p_uncond", 0.0)

    def loss_fn(params, batch, key, state):
        del state
        k_t, k_eps, k_drop, k_label = jax.random.split(key, 4)
        x0 = batch["x"]
        y = None
        if conditional:
            y = batch["y"]
            if p_uncond > 0:
                y = losses.drop_condition(k_label, y, p_uncond, num_classes)
        t = sample_t(config.loss, k_t, (x0.shape[0],), process)
        eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
        apply = make_apply(model, params, y, noise_scale=noise_scale, train=True, rng=k_drop)
        if prediction == "edm":
            apply, target = as_denoiser(apply, process, "edm"), "x0"
        else:
            target = prediction
        per_example = losses.denoising_loss(
            apply, process, x0, t, eps, prediction=target, weighting=config.loss.weighting
        )
        return jnp.mean(per_example), {}

    return loss_fn


def make_train_step(
    model,
    process,
    tx: optax.GradientTransformation,
    config,
    num_classes: int | None = None,
    *,
    axis_name: str | None = None,
):
    """Build ``train_step(state, batch) -> (state, metrics)`` for a recipe.

    :func:`make_step` of the recipe's :func:`make_denoising_loss`. The EMA decay is
    ``train.ema_decay``, warmed up unless ``train.ema_warmup`` is false. Metrics: ``loss``,
    ``grad_norm``, ``nonfinite`` (updates skipped so far) and ``nonfinite_in_a_row`` (skipped
    since the last finite one). ``axis_name`` makes the step
    data-parallel under ``jax.pmap(train_step, axis_name=axis_name)``: per-device noise,
    gradients and metrics averaged over the devices before the update (see
    :func:`make_step`); ``nonfinite`` is then the same on every device. The default
    ``None`` is for one device or for ``jax.jit`` over a device mesh.
    """
    _check_axis_name(axis_name)
    decay, warmup = config.train.ema_decay, config.train.get("ema_warmup", True)
    loss_fn = make_denoising_loss(model, process, config, num_classes)
    step = make_step(loss_fn, tx, lambda k: ema_decay(k, decay, warmup), axis_name=axis_name)

    def train_step(state: TrainState, batch):
        state, metrics = step(state, batch)
        opt_state = state.opt_state
        skipped = {"nonfinite": nonfinite_count(opt_state), "nonfinite_in_a_row": nonfinite_in_a_row(opt_state)}
        return state, {**metrics, **skipped}

    return train_step
