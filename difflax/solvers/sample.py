"""``difflax.sample``: draw samples with any solver on any grid, and SDEdit, its start from a noised input."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from difflax.processes import check_t
from difflax.solvers.adaptive import Adaptive
from difflax.solvers.base import run
from difflax.solvers.grids import make_grid
from difflax.solvers.registry import default_grid, resolve_grid, resolve_solver

__all__ = ["sample", "sdedit"]


def sample(
    denoise: Callable,
    process,
    x_T: jax.Array,
    solver="dpmpp_2m",
    steps: int = 10,
    grid=None,
    key: jax.Array | None = None,
    return_trajectory: bool = False,
    final_zero: bool | None = None,
    **solver_args,
):
    """Draw samples by integrating from ``x_T`` at ``t_max`` down to the data.

    Args:
      denoise: the denoiser ``denoise(x_t, t) -> x0_hat``; ``t`` is passed as ``(batch,)``.
      process: the forward process the denoiser belongs to.
      x_T: the starting noise, e.g. ``process.prior_sample(key, shape)``.
      solver: a name from :data:`difflax.solvers.SOLVERS` or a solver object (a
        :class:`~difflax.solvers.base.Solver`, wrappers such as
        :class:`~difflax.solvers.inpainting.ReplaceKnown` included).
      steps: number of steps (static), including the final denoising step.
      grid: a grid name from :data:`difflax.solvers.GRIDS` (default: the solver's
        ``default_grid``, adapted to the process by :func:`~difflax.solvers.registry.default_grid`)
        or an array of decreasing times; an array ending in an exact 0 finishes with the
        denoising step.
      key: PRNG key; required by stochastic solvers. Step ``i`` gets ``fold_in(key, i)``.
      return_trajectory: also return every intermediate ``x`` in ``info["trajectory"]``.
      final_zero: end with the denoising step ``D(x, t_min)`` (default ``True`` for named
        grids; for a traced array grid it must be given).
      **solver_args: hyper-parameters of the solver (``eta``, ``s_churn``, ...), traced.

    Returns:
      ``(x0, info)`` with ``info["nfe"]`` the number of denoiser evaluations made.
    """
    solver = resolve_solver(solver, solver_args)
    ts, final_zero = resolve_grid(grid, solver, process, steps, final_zero)
    if isinstance(solver, Adaptive):
        if return_trajectory:
            raise ValueError("solver 'adaptive' chooses its own steps and keeps no trajectory: "
                             "use return_trajectory=False, or a fixed-step solver.")
        return solver.solve(denoise, process, x_T, ts, final_zero=final_zero, key=key)
    return run(solver, denoise, process, x_T, ts, final_zero=final_zero, key=key, return_trajectory=return_trajectory)


def sdedit(
    denoise: Callable,
    process,
    x_init: jax.Array,
    t_start,
    key: jax.Array,
    *,
    solver="ddpm",
    steps: int = 20,
    grid=None,
    return_trajectory: bool = False,
    **solver_args,
):
    r"""SDEdit (Meng et al. 2022, "SDEdit: guided image synthesis and editing with stochastic
    differential equations"): noise ``x_init`` to ``t_start`` with the forward marginal,
    ``x = alpha(t_start) x_init + sigma(t_start) z``, and solve from ``t_start`` down to the
    data on a grid restricted to ``[t_min, t_start]`` (the named grid of ``process`` with
    ``t_max = t_start``; default: the solver's for ``process``), with ``steps`` steps. Small
    ``t_start`` stays faithful to ``x_init``, large ``t_start`` (the paper: ``t0`` in
    ``[0.3, 0.6]`` of the VP range) gives realism. ``t_start`` may be traced. Returns :func:`sample`'s ``(x0, info)``.
    """
    check_t(t_start, process.t_min, process.t_max, name="t_start")
    solver = resolve_solver(solver, solver_args)
    grid = default_grid(solver, process) if grid is None else grid
    if not isinstance(grid, str):
        raise ValueError(f"grid must be a grid name for sdedit (it is restricted to [t_min, t_start]); got {grid!r}.")
    x_init = jnp.asarray(x_init)
    k_noise, k_solver = jax.random.split(key)
    t0 = jnp.asarray(t_start, dtype=jnp.result_type(x_init, float))
    x = process.marginal(x_init, t0, jax.random.normal(k_noise, x_init.shape, x_init.dtype))
    ts = make_grid(grid, dataclasses.replace(process, t_max=t0), steps, final_zero=True)
    return sample(denoise, process, x, solver=solver, steps=steps, grid=ts, key=k_solver, final_zero=True,
                  return_trajectory=return_trajectory)
