"""The solver protocol, shared step coefficients, and the sampling loop.

A solver is an immutable pytree (``flax.struct.dataclass``): static fields (order,
variant) decide the program, array fields (``eta``, ``s_churn``, ...) are traced, so
sweeping them under ``jit`` never recompiles. Each solver has two pure functions

* ``init(process, x_T, key, num_steps) -> SolverState``
* ``step(denoise, process, state, t, t_next) -> SolverState``

and :func:`run` drives them with one ``lax.scan`` over a time grid, finishing with the
denoising step ``x0 = D(x, t_min)`` when the grid ends in an exact zero.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array

__all__ = [
    "Coefficients",
    "SolverState",
    "call",
    "coefficients",
    "eps_from_x0",
    "exp_neg_h",
    "finish",
    "init_state",
    "run",
    "time_vector",
]


@struct.dataclass
class SolverState:
    """State carried by every solver through the scan.

    Attributes:
      x: current sample.
      key: PRNG key for stochastic solvers (``None`` for deterministic ones).
      nfe: number of denoiser evaluations so far (int32 scalar).
      step: number of steps taken so far (int32 scalar).
      extra: solver-specific history (previous predictions for multistep methods).
    """

    x: Array
    key: Array | None
    nfe: Array
    step: Array
    extra: Any = None

    def next_key(self):
        """``(state with a fresh key, subkey)``."""
        key, sub = jax.random.split(self.key)
        return self.replace(key=key), sub


@struct.dataclass
class Coefficients:
    """``alpha``, ``sigma`` and ``lambda = log(alpha / sigma)`` (half the log-SNR) at one time."""

    t: Array
    alpha: Array
    sigma: Array
    lam: Array


def coefficients(process, t) -> Coefficients:
    alpha, sigma = process.alpha_sigma(t)
    return Coefficients(t=t, alpha=alpha, sigma=sigma, lam=0.5 * process.log_snr(t))


def time_vector(t, x):
    """The denoiser's ``t`` argument: the scalar time broadcast to the batch, ``(batch,)``."""
    return jnp.full((x.shape[0],), t, dtype=x.dtype)


def call(denoise: Callable, x: Array, t) -> Array:
    """Evaluate the denoiser at a scalar time, checking the contract's shape."""
    out = denoise(x, time_vector(t, x))
    if out.shape != x.shape:
        raise ValueError(f"denoise must return an array of the shape of x {x.shape}; got {out.shape}.")
    return out


def eps_from_x0(x, x0, c: Coefficients):
    return (x - c.alpha * x0) / c.sigma


def exp_neg_h(s: Coefficients, t: Coefficients):
    """``exp(-(lambda_t - lambda_s)) = alpha_s sigma_t / (alpha_t sigma_s)`` without forming infinities."""
    return (s.alpha * t.sigma) / (t.alpha * s.sigma)


def init_state(x, key, extra=None) -> SolverState:
    return SolverState(x=x, key=key, nfe=jnp.zeros((), jnp.int32), step=jnp.zeros((), jnp.int32), extra=extra)


def run(
    solver,
    denoise: Callable,
    process,
    x_T: Array,
    ts: Array,
    *,
    final_zero: bool,
    key: Array | None = None,
    return_trajectory: bool = False,
):
    """Integrate from ``ts[0]`` along the grid ``ts`` with ``solver``; see :func:`difflax.sample`."""
    positive = ts[:-1] if final_zero else ts
    num_steps = ts.shape[0] - 1
    state = solver.init(process, x_T, key, num_steps)

    def body(state, times):
        t, t_next = times
        state = solver.step(denoise, process, state, t, t_next)
        return state, (state.x if return_trajectory else None)

    state, traj = jax.lax.scan(body, state, (positive[:-1], positive[1:]))
    return finish(denoise, state, x_T, traj, ts, final_zero=final_zero)


def finish(denoise: Callable, state: SolverState, x_T: Array, traj, ts: Array, *, final_zero: bool):
    """End a scan over the grid ``ts``: the final denoising step (if ``final_zero``) and ``info``.

    ``traj`` is the stacked per-step ``x`` of the scan, or ``None``.
    """
    x, nfe = state.x, state.nfe
    if final_zero:
        x = call(denoise, x, ts[-2])
        nfe = nfe + 1
    info = {"nfe": nfe, "steps": ts.shape[0] - 1, "ts": ts}
    if traj is not None:
        info["trajectory"] = jnp.concatenate([x_T[None], traj, x[None]] if final_zero else [x_T[None], traj])
    return x, info
