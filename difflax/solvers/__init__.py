"""Samplers: every solver as pure ``init`` / ``step`` functions, driven by one ``lax.scan``.

>>> x0, info = difflax.sample(denoise, process, x_T, solver="dpmpp_2m", steps=10, grid="logsnr")

Solvers are immutable configs; :data:`SOLVERS` maps names to them and
:func:`get_solver` builds one from a name and keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from difflax.solvers import grids
from difflax.solvers.adaptive import Adaptive
from difflax.solvers.ancestral import DDIM, DDPM
from difflax.solvers.base import SolverState, run
from difflax.solvers.deis import DEIS
from difflax.solvers.dpm import DPMSolver, DPMSolverPP2M, DPMSolverPP2MSDE, DPMSolverPP2S, DPMSolverPP3M
from difflax.solvers.grids import GRIDS, check_grid, make_grid
from difflax.solvers.ode import EDMStochastic, Euler, Heun
from difflax.solvers.optimize import optimize_grid
from difflax.solvers.parallel import picard_sample
from difflax.solvers.scaling import to_edm
from difflax.solvers.sde import ALD, PC, EulerMaruyama
from difflax.solvers.speculative import reflection_coupling, speculative_sample
from difflax.solvers.unipc import UniPC

SOLVERS: dict[str, Callable] = {
    "ddpm": DDPM,
    "ddim": DDIM,
    "euler": Euler,
    "heun": Heun,
    "edm": EDMStochastic,
    "euler_maruyama": EulerMaruyama,
    "pc": PC,
    "ald": ALD,
    "adaptive": Adaptive,
    "dpm_solver": DPMSolver,
    "dpmpp_2s": DPMSolverPP2S,
    "dpmpp_2m": DPMSolverPP2M,
    "dpmpp_3m": DPMSolverPP3M,
    "dpmpp_2m_sde": DPMSolverPP2MSDE,
    "unipc": UniPC,
    "deis": DEIS,
}

# Grid each solver uses when none is given.
DEFAULT_GRIDS = {
    "ddpm": "uniform",
    "ddim": "uniform",
    "euler": "karras",
    "heun": "karras",
    "edm": "karras",
    "euler_maruyama": "uniform",
    "pc": "uniform",
    "ald": "uniform",
    "adaptive": "uniform",  # only the ends are used
    "dpm_solver": "logsnr",
    "dpmpp_2s": "logsnr",
    "dpmpp_2m": "logsnr",
    "dpmpp_3m": "logsnr",
    "dpmpp_2m_sde": "karras",
    "unipc": "logsnr",
    "deis": "logsnr",
}

__all__ = [
    "ALD",
    "DDIM",
    "DDPM",
    "DEIS",
    "GRIDS",
    "PC",
    "SOLVERS",
    "Adaptive",
    "DPMSolver",
    "DPMSolverPP2M",
    "DPMSolverPP2MSDE",
    "DPMSolverPP2S",
    "DPMSolverPP3M",
    "EDMStochastic",
    "Euler",
    "EulerMaruyama",
    "Heun",
    "SolverState",
    "UniPC",
    "get_solver",
    "grids",
    "make_grid",
    "optimize_grid",
    "picard_sample",
    "reflection_coupling",
    "resolve_grid",
    "resolve_solver",
    "sample",
    "speculative_sample",
    "to_edm",
]


def get_solver(name: str, **kwargs):
    """Build the solver ``name`` with its hyper-parameters ``kwargs``."""
    if name not in SOLVERS:
        raise ValueError(f"Unknown solver {name!r}; expected one of {', '.join(map(repr, sorted(SOLVERS)))}.")
    try:
        return SOLVERS[name](**kwargs)
    except TypeError as err:
        raise TypeError(f"solver {name!r}: {err}") from None


def resolve_solver(solver, solver_args: dict):
    """``(name, solver)`` from a registry name plus keywords, or from a solver object."""
    if isinstance(solver, str):
        return solver, get_solver(solver, **solver_args)
    if solver_args:
        raise ValueError("pass solver hyper-parameters either in the solver object or as keywords, not both.")
    return next((k for k, cls in SOLVERS.items() if cls is type(solver)), type(solver).__name__), solver


def resolve_grid(grid, solver_name: str, process, steps: int, final_zero: bool | None = None):
    """``(ts, final_zero)`` from a grid name (default: the solver's) or a user array."""
    if grid is None:
        grid = DEFAULT_GRIDS.get(solver_name, "logsnr")
    if isinstance(grid, str):
        final_zero = True if final_zero is None else final_zero
        return make_grid(grid, process, steps, final_zero=final_zero), final_zero
    ts, ends_in_zero = check_grid(grid, process)
    if final_zero is None:
        if ends_in_zero is None:
            raise ValueError("grid is a traced array: pass final_zero=True or False.")
        final_zero = ends_in_zero
    return ts, final_zero


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
      solver: a name from :data:`SOLVERS` or a solver object.
      steps: number of steps (static), including the final denoising step.
      grid: a grid name from :data:`GRIDS` (default: the solver's) or an array of
        decreasing times; an array ending in an exact 0 finishes with the denoising step.
      key: PRNG key; required by stochastic solvers.
      return_trajectory: also return every intermediate ``x`` in ``info["trajectory"]``.
      final_zero: end with the denoising step ``D(x, t_min)`` (default ``True`` for named
        grids; for a traced array grid it must be given).
      **solver_args: hyper-parameters of the solver (``eta``, ``s_churn``, ...), traced.

    Returns:
      ``(x0, info)`` with ``info["nfe"]`` the number of denoiser evaluations made.
    """
    name, solver = resolve_solver(solver, solver_args)
    ts, final_zero = resolve_grid(grid, name, process, steps, final_zero)
    if solver.stochastic and key is None:
        raise ValueError(f"solver {name!r} is stochastic with these settings; pass key=jax.random.key(...).")
    if hasattr(solver, "solve"):  # adaptive solvers do their own stepping
        return solver.solve(denoise, process, x_T, ts, final_zero=final_zero, key=key)
    return run(solver, denoise, process, x_T, ts, final_zero=final_zero, key=key, return_trajectory=return_trajectory)
