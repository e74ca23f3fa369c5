"""Optimizers from config: Adam / AdamW, warm-up and cosine schedules, clipping, NaN skipping."""

from __future__ import annotations

import optax

__all__ = ["make_optimizer", "make_schedule", "nonfinite_count", "nonfinite_in_a_row", "skip_nonfinite", "update_rule"]

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine")
_NEVER = 2**31 - 1  # apply_if_finite's counter saturates at the int32 maximum, so it never exceeds this


def make_schedule(config, total_steps: int) -> optax.Schedule:
    """Linear warm-up over ``warmup_steps`` to ``learning_rate``, then constant or cosine decay."""
    if config.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {SCHEDULES}; got {config.schedule!r}.")
    warmup = int(config.warmup_steps)
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, config.learning_rate, max(warmup, 1), max(total_steps, warmup + 1), end_value=0.0
        )
    if warmup == 0:
        return optax.constant_schedule(config.learning_rate)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, config.learning_rate, warmup), optax.constant_schedule(config.learning_rate)],
        [warmup],
    )


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
    """The optimizer described by ``config`` (the ``optim`` block of a recipe).

    Gradient clipping by global norm (``grad_clip > 0``), then Adam or AdamW on the
    schedule. ``optax.apply_if_finite`` skips every update whose gradients are not finite
    and counts them (:func:`nonfinite_count`, and :func:`nonfinite_in_a_row` for the current
    run of them), so a bad batch never corrupts the state. It never gives up and applies
    one (its limit is set beyond reach): stopping after ``max_nonfinite`` in a row is the
    training loop's decision, which it takes before saving anything.
    ``grad_accum > 1`` accumulates gradients over that many steps (``optax.MultiSteps``).
    """
    tx = skip_nonfinite(update_rule(config, total_steps))
    if config.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(config.grad_accum))
    return tx


def update_rule(config, total_steps: int) -> optax.GradientTransformation:
    """:func:`make_optimizer`'s update alone: clipping by global norm, then Adam or AdamW on the schedule."""
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"optim.optimizer must be one of {OPTIMIZERS}; got {config.optimizer!r}.")
    schedule = make_schedule(config, total_steps)
    if config.optimizer == "adam":
        base = optax.adam(schedule, b1=config.b1, b2=config.b2, eps=config.eps)
    else:
        base = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay)
    parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []
    return optax.chain(*parts, base)


def skip_nonfinite(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` skipping (and counting) every update whose gradients are not finite, never giving up."""
    return optax.apply_if_finite(tx, max_consecutive_errors=_NEVER)


def nonfinite_count(opt_state):
    """Total number of skipped (non-finite) updates recorded in an optimizer state."""
    return optax.tree_utils.tree_get(opt_state, "total_notfinite")


def nonfinite_in_a_row(opt_state):
    """Number of consecutive skipped (non-finite) updates up to now (0 after a finite one)."""
    return optax.tree_utils.tree_get(opt_state, "notfinite_count")
