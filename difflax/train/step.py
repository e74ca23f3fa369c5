"""The pure training step ``(state, batch) -> (state, metrics)``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from difflax import losses
from difflax.parametrization import as_denoiser
from difflax.train.builders import make_apply, sample_t
from difflax.train.optim import nonfinite_count
from difflax.train.state import TrainState, ema_decay, update_ema

__all__ = ["make_train_step"]


def make_train_step(model, process, tx: optax.GradientTransformation, config, num_classes: int | None = None):
    """Build ``train_step(state, batch) -> (state, metrics)`` for a recipe.

    The loss is :func:`difflax.losses.denoising_loss` on the network's own output
    (``model.prediction``: eps, x0, v, velocity, or ``"edm"`` for the preconditioned
    ``F`` of Karras et al., trained through its ``x0`` output) with the recipe's
    weighting and noise-level sampler. Labels are dropped to the null class with
    probability ``loss.p_uncond`` for classifier-free guidance. Metrics: ``loss``,
    ``grad_norm``, ``nonfinite`` (updates skipped so far).
    """
    prediction = config.model.prediction
    noise_scale = config.model.get("noise_scale", 1.0)
    conditional = bool(config.model.get("class_conditional", False))
    p_uncond = config.loss.get("p_uncond", 0.0)

    def loss_fn(params, batch, key):
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
        return jnp.mean(per_example)

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(state.key(), state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay(state.step, config.train.ema_decay, config.train.get("ema_warmup", True))
        state = state.replace(
            step=state.step + 1,
            params=params,
            ema_params=update_ema(state.ema_params, params, decay),
            opt_state=opt_state,
        )
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "nonfinite": nonfinite_count(opt_state)}
        return state, metrics

    return train_step
