"""A generic training loop for any loss over parameters: what distillation methods train with.

The diffusion recipes train with :class:`~difflax.train.loop.Trainer`; distillation
methods each have their own loss over a frozen teacher (:mod:`difflax.distill`), and
:func:`fit` drives any of them: ``loss_fn(params, batch, key, state) -> (loss, metrics)``,
one jitted step of :func:`~difflax.train.step.make_step` (optax update and EMA of the
parameters) per step, and an optional Orbax checkpoint so an interrupted run resumes exactly.

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

from difflax.train.state import TrainState
from difflax.train.step import make_step

__all__ = ["fit"]


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
        state, _ = checkpointer.restore_intact(state)
    step_fn = jax.jit(make_step(loss_fn, tx, ema), donate_argnums=0)
    history, start = [], time.perf_counter()
    for step in tqdm(range(int(state.step), steps), desc=desc, disable=not progress):
        state, metrics = step_fn(state, batches(step))
        done = step + 1
        saving = checkpointer is not None and (done == steps or (save_every and done % save_every == 0))
        if done % log_every == 0 or done == steps or saving:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            history.append({"step": done, "seconds": time.perf_counter() - start, **metrics})
            if not all(map(math.isfinite, metrics.values())):
                raise FloatingPointError(f"{desc}: non-finite metrics at step {done}: {metrics}")
        if saving:
            checkpointer.save(done, state, {"step": done}, metrics={"loss": metrics["loss"]})
    if checkpointer is not None:
        checkpointer.wait()
    return state, history
