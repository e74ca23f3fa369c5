"""A generic training loop for any loss over parameters: what distillation methods train with.

The diffusion recipes train with :class:`~difflax.train.loop.Trainer`; distillation
methods each have their own loss over a frozen teacher (:mod:`difflax.distill`), and
:func:`fit` drives any of them: ``loss_fn(params, batch, key, state) -> (loss, metrics)``,
one jitted optax update per step, an EMA of the parameters, and an optional Orbax
checkpoint so an interrupted run resumes exactly.

Adversarial methods (a generator and a critic, or a generator and an auxiliary score
model) train both players with one loss ``L_1(theta_1, sg(theta_2)) + L_2(sg(theta_1),
theta_2)``: the gradient of the sum with respect to each player's parameters is that
player's own gradient.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm

from difflax.train.state import TrainState, ema_decay, update_ema

__all__ = ["fit", "make_fit_step"]


def make_fit_step(loss_fn: Callable, tx: optax.GradientTransformation, ema=0.0):
    """``step(state, batch) -> (state, metrics)`` for ``loss_fn(params, batch, key, state) -> (loss, metrics)``.

    ``ema`` is a decay, or a function ``ema(step) -> decay`` (e.g. the adaptive target
    decay of consistency training); a float decay is warmed up as in :func:`ema_decay`.
    """

    def step(state: TrainState, batch):
        key = jax.random.fold_in(state.key(), state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key, state)
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


def fit(
    loss_fn: Callable,
    params,
    tx: optax.GradientTransformation,
    batches: Callable,
    steps: int,
    *,
    key: jax.Array,
    ema: float = 0.0,
    log_every: int = 100,
    checkpointer=None,
    save_every: int = 0,
    progress: bool = False,
    desc: str = "fit",
):
    """Minimize ``loss_fn`` for ``steps`` steps from ``params`` (or the latest checkpoint).

    Args:
      loss_fn: ``loss_fn(params, batch, key, state) -> (scalar loss, dict of scalar metrics)``;
        ``state`` is the :class:`~difflax.train.state.TrainState` before the update (its
        ``step``, and ``ema_params`` for methods whose target is an EMA of the student).
      params: initial parameters (any pytree).
      tx: the optax optimizer.
      batches: ``batches(step) -> batch``, a pure function of the step so that a resumed
        run sees the same data.
      steps: total number of steps.
      key: PRNG key; step ``k`` uses ``fold_in(key, k)``.
      ema: EMA decay of the parameters, or ``ema(step) -> decay`` (0 keeps no average:
        ``ema_params`` is ``params``).
      log_every: record metrics every this many steps (and at the end).
      checkpointer: a :class:`~difflax.train.checkpoint.Checkpointer` to resume from and save to.
      save_every: save every this many steps (0: only at the end) when a checkpointer is given.

    Returns:
      ``(state, history)``: the final :class:`~difflax.train.state.TrainState` (``params``,
      ``ema_params``, ``step``) and a list of metric dicts with ``step`` and ``seconds``.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}.")
    # the jitted step donates its state: copy, so that the caller's params and key stay valid
    state = jax.tree.map(jnp.copy, TrainState.create(params, tx, key))
    if checkpointer is not None and checkpointer.latest_step() is not None:
        state, _ = checkpointer.restore(state)
    step_fn = jax.jit(make_fit_step(loss_fn, tx, ema), donate_argnums=0)
    history, start, last = [], time.perf_counter(), {}
    for step in tqdm(range(int(state.step), steps), desc=desc, disable=not progress):
        state, metrics = step_fn(state, batches(step))
        done = step + 1
        if done % log_every == 0 or done == steps:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            history.append({"step": done, "seconds": time.perf_counter() - start, **metrics})
            last = {"loss": metrics["loss"]}
            if not all(map(math.isfinite, metrics.values())):
                raise FloatingPointError(f"{desc}: non-finite metrics at step {done}: {metrics}")
        if checkpointer is not None and save_every and done % save_every == 0 and done != steps:
            checkpointer.save(done, state, {"step": done}, metrics=last or None)
    if checkpointer is not None:
        checkpointer.save(int(state.step), state, {"step": int(state.step)}, metrics=last or None, force=True)
        checkpointer.wait()
    return state, history
