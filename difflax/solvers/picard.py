"""Parallel-in-time sampling by Picard iteration: ParaDiGMS (Shih et al. 2023).

"Parallel sampling of diffusion models" (Shih, Belkhale, Ermon, Sadigh and Anari,
NeurIPS 2023). A first-order sampler on the grid ``t_0 > ... > t_N`` is a recursion

    x_{n+1} = x_n + d_n(x_n),    d_n(x) = a_n x + b_n D(x, t_n) + c_n z_n - x,

with per-step scalars ``a_n, b_n, c_n`` and one denoiser evaluation per step:

* ``"ddim"`` (DDIM with ``eta = 0`` = DPM-Solver-1, the exponential integrator of the
  probability-flow ODE): ``a_n = sigma_{n+1} / sigma_n``, ``b_n = alpha_{n+1} - a_n alpha_n``, ``c_n = 0``;
* ``"euler"`` (explicit Euler on the probability-flow ODE in process time, see
  :mod:`difflax.solvers.ode`): with ``dt = t_{n+1} - t_n``,
  ``a_n = 1 + dt sigma'_n / sigma_n``, ``b_n = dt (alpha'_n - sigma'_n alpha_n / sigma_n)``, ``c_n = 0``;
* ``"ddpm"`` (ancestral sampling, DDIM with ``eta = 1``): ``a_n = sigma_{n+1} e^{-h_n} / sigma_n``,
  ``b_n = alpha_{n+1} - a_n alpha_n``, ``c_n = sigma_{n+1} sqrt(1 - e^{-2 h_n})``, with the noise
  ``z_n`` of every step drawn once, up front (the same in every round), so the iteration
  converges to the sequential sampler driven by that noise;
* the final denoising step of a grid ending in an exact 0 is ``x_N = D(x_{N-1}, t_min)``:
  ``a = 0, b = 1, c = 0``.

The fixed point ``x_{n+1} = x_b + sum_{b <= m <= n} d_m(x_m)`` is found by Picard iteration
on a sliding window of ``p`` steps ``[b, b + p)``: each round evaluates the drifts of all
steps of the window at the current guesses in ONE batched denoiser call (the denoiser
``vmap``-ed over the window, so every call sees one state of the batch's shape and a time
vector per example, and a condition the denoiser closes over applies at every position)
and replaces the guesses by ``x_b + cumsum(d)``. The window then slides past the converged
steps (Shih et al. 2023, alg. 1): with ``M`` the number of values of one example, the error
of position ``k`` is

    e_k = |x_k^new - x_k^old|^2 / M   (the largest over the batch: one window for the batch),

and position ``k`` has converged when ``e_k <= tol^2 v_k``, where ``v_k = sigma_{k+1}^2 (1 -
e^{-2 h_k})`` is the variance of the ancestral (DDPM) step out of ``t_k`` (the noise scale of
the paper's tolerance; ``v = 0`` for the final denoising step and the end of the grid, which
then only pass when unchanged). If ``k*`` is the first position that has not converged,
the window starts at ``k*`` next round (every position up to it was computed from
converged inputs), so a round advances by ``1 <= stride <= p``; new positions entering the
window start from the last computed state. After ``N`` rounds the result is exactly the
sequential sampler's, so the loop (one ``lax.while_loop``) always ends by ``max_rounds = N``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from difflax.checks import check_batched, check_positive_int
from difflax.solvers.registry import get_solver, resolve_grid
from difflax.transitions import coefficients, exp_neg_h, posterior_std

Array = jax.Array

__all__ = ["PICARD_SOLVERS", "picard_sample", "step_coefficients"]

PICARD_SOLVERS = ("ddim", "euler", "ddpm")


def _evaluate(denoise: Callable, x: Array, t: Array) -> Array:
    out = denoise(x, t)
    if out.shape != x.shape:
        raise ValueError(f"denoise must return an array of the shape of x {x.shape}; got {out.shape}.")
    return out


def step_coefficients(solver: str, process, ts: Array, final_zero: bool) -> tuple[Array, Array, Array, Array]:
    """``(a, b, c, v)`` of the ``N`` steps of the grid ``ts`` (each of shape ``(N,)``).

    Step ``n`` is ``x_{n+1} = a_n x_n + b_n D(x_n, t_n) + c_n z_n``; ``v_n`` is the variance
    of the ancestral step ``t_n -> t_{n+1}`` (the scale of the convergence test).
    """
    if solver not in PICARD_SOLVERS:
        raise ValueError(f"Unknown solver {solver!r} for picard_sample; expected one of {', '.join(PICARD_SOLVERS)}.")
    pos = ts[:-1] if final_zero else ts
    s, t = coefficients(process, pos[:-1]), coefficients(process, pos[1:])
    ratio = exp_neg_h(s, t)  # e^{-h}
    std = posterior_std(s, t)
    var = std**2
    zeros = jnp.zeros_like(ratio)
    if solver == "ddim":
        a = t.sigma / s.sigma
        b, c = t.alpha - a * s.alpha, zeros
    elif solver == "ddpm":
        a = t.sigma * ratio / s.sigma
        b, c = t.alpha - a * s.alpha, std
    else:  # euler
        dt = pos[1:] - pos[:-1]
        d_alpha, d_sigma = process.alpha_sigma_derivatives(pos[:-1])
        a = 1.0 + dt * d_sigma / s.sigma
        b, c = dt * (d_alpha - d_sigma * s.alpha / s.sigma), zeros
    if final_zero:  # x_N = D(x_{N-1}, t_min)
        end = lambda v, value: jnp.concatenate([v, jnp.full((1,), value, v.dtype)])
        a, b, c, var = end(a, 0.0), end(b, 1.0), end(c, 0.0), end(var, 0.0)
    return a, b, c, var


def picard_sample(
    denoise: Callable,
    process,
    x_T: Array,
    *,
    solver: str = "ddim",
    steps: int,
    grid=None,
    window: int | None = None,
    tol: float = 0.1,
    max_rounds: int | None = None,
    final_zero: bool | None = None,
    key: Array | None = None,
):
    """ParaDiGMS: the sampler ``solver`` on ``steps`` steps, by Picard rounds over a sliding window.

    Args:
      denoise: the denoiser ``denoise(x_t, t) -> x0_hat``; called once per round, ``vmap``-ed
        over the window positions, each with ``x_t`` of the shape of ``x_T`` and ``t`` of shape
        ``(batch,)`` (so a class-conditional denoiser closing over ``(batch,)`` labels works).
      process: the forward process.
      x_T: starting noise, shape ``(batch, ...)``.
      solver: ``"ddim"`` (eta 0), ``"euler"`` (probability-flow ODE) or ``"ddpm"`` (ancestral, needs ``key``).
      steps: grid intervals (static), as in :func:`difflax.sample`.
      grid: a grid name (default: the solver's, as in :func:`difflax.sample`) or an array of times.
      window: the largest number of steps evaluated per round (static; default: all ``steps``).
      tol: tolerance ``tau`` of the test ``|x_new - x_old|^2 / D <= tau^2 v`` (traced).
      max_rounds: stop after this many rounds even if not converged (static; default
        ``steps``, enough for the exact sequential result).
      final_zero: as in :func:`difflax.sample`.
      key: PRNG key for ``"ddpm"`` (the noise of all steps is drawn once, up front).

    Returns:
      ``(x, info)`` with ``info["rounds"]`` (sequential batched denoiser calls), ``nfe``
      (steps evaluated per example, summed over rounds: the window's valid positions),
      ``padded_nfe`` (``rounds * window``: what the fixed-shape batched calls evaluate),
      ``converged`` (the window reached the end of the grid), ``steps`` and ``ts``.
    """
    if solver not in PICARD_SOLVERS:
        raise ValueError(f"Unknown solver {solver!r} for picard_sample; expected one of {', '.join(PICARD_SOLVERS)}.")
    if solver == "ddpm" and key is None:
        raise ValueError("solver 'ddpm' is stochastic; pass key=jax.random.key(...).")
    x_T = jnp.asarray(x_T)
    check_batched(x_T, "x_T")
    ts, final_zero = resolve_grid(grid, get_solver(solver), process, steps, final_zero)
    N = ts.shape[0] - 1  # steps, the final denoising step included
    window = check_positive_int(N if window is None else window, "window")
    max_rounds = check_positive_int(N if max_rounds is None else max_rounds, "max_rounds")
    p = min(window, N)
    B = x_T.shape[0]
    dtype = x_T.dtype

    a, b, c, var = (v.astype(dtype) for v in step_coefficients(solver, process, ts, final_zero))
    t_in = ts[:N].astype(dtype)  # time of the input of step n (t_min for the final denoising step)
    v_out = jnp.concatenate([var, jnp.zeros((1,), dtype)])  # variance of the step out of position m
    tol2 = jnp.asarray(tol, dtype) ** 2
    j = jnp.arange(p, dtype=jnp.int32)
    at = lambda v, like: v.reshape(v.shape + (1,) * (like.ndim - v.ndim))

    noise = None
    if solver == "ddpm":  # drawn once: step n adds the same noise in every round
        z = jax.random.normal(key, (N, *x_T.shape), dtype)
        noise = at(c, z) * z

    def round_(carry):
        X, start, rounds, nfe = carry
        k = start + j  # steps of the window
        valid = k < N
        kc = jnp.minimum(k, N - 1)
        xs = X[kc]  # (p, B, ...)
        x0 = jax.vmap(lambda y, t: _evaluate(denoise, y, t))(xs, jnp.broadcast_to(t_in[kc][:, None], (p, B)))
        new = at(a[kc], xs) * xs + at(b[kc], xs) * x0
        if noise is not None:
            new = new + noise[kc]
        drift = jnp.where(at(valid, xs), new - xs, 0.0)
        cand = X[start][None] + jnp.cumsum(drift, axis=0)  # guesses for positions k + 1
        old = X[jnp.minimum(k + 1, N)]
        err = jnp.max(jnp.mean((cand - old).reshape(p, B, -1) ** 2, axis=-1), axis=-1)  # (p,)
        ok = valid & (err <= tol2 * v_out[jnp.minimum(k + 1, N)])
        fail = ~ok
        first = jnp.where(jnp.any(fail), jnp.argmax(fail).astype(jnp.int32), p)
        stride = jnp.minimum(first + 1, p)
        X = X.at[jnp.where(valid, k + 1, N + 1)].set(cand, mode="drop")
        end = jnp.minimum(start + p, N)  # last position computed this round
        later = at(jnp.arange(N + 1) > end, X)
        X = jnp.where(later, X[end][None], X)  # new window positions start from the last state
        return X, jnp.minimum(start + stride, N), rounds + 1, nfe + jnp.sum(valid, dtype=jnp.int32)

    def going(carry):
        _, start, rounds, _ = carry
        return (start < N) & (rounds < max_rounds)

    X0 = jnp.broadcast_to(x_T[None], (N + 1, *x_T.shape))
    zero = jnp.zeros((), jnp.int32)
    X, start, rounds, nfe = jax.lax.while_loop(going, round_, (X0, zero, zero, zero))
    info = {
        "rounds": rounds,
        "nfe": nfe,
        "padded_nfe": rounds * p,
        "converged": start >= N,
        "steps": ts.shape[0] - 1,
        "ts": ts,
    }
    return X[N], info
