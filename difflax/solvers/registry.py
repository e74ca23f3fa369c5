"""Solver names, and resolving the ``solver`` and ``grid`` arguments every sampler takes."""

from __future__ import annotations

import jax

from difflax.solvers.adaptive import Adaptive
from difflax.solvers.ancestral import DDIM, DDPM
from difflax.solvers.base import Solver
from difflax.solvers.deis import DEIS
from difflax.solvers.dpm import DPMSolver, DPMSolverPP2M, DPMSolverPP2MSDE, DPMSolverPP2S, DPMSolverPP3M
from difflax.solvers.grids import check_grid, make_grid
from difflax.solvers.ipndm import IPNDM
from difflax.solvers.ode import EDMStochastic, Euler, Heun
from difflax.solvers.sde import ALD, PC, EulerMaruyama
from difflax.solvers.unipc import UniPC

__all__ = ["DEFAULT_GRIDS", "SOLVERS", "default_grid", "get_solver", "resolve_grid", "resolve_solver"]

SOLVERS: dict[str, type] = {
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
    "ipndm": IPNDM,
}


# The grid ``difflax.sample`` uses when none is given is the solver's ``default_grid``, its preferred
# spacing, replaced where that spacing spreads the steps badly over the time of a kind of process
# (``process.grid_kind``): {solver's grid: replacement}.
DEFAULT_GRIDS: dict[str, dict[str, str]] = {
    # A diffusion clock (VP, DDPM linear and scaled-linear tables). Karras et al.'s rho-spacing is
    # designed for ODE steps in sigma, not in this clock; "trailing" stops at t_max / steps, still far
    # from the data (VP, 10 steps: sigma / alpha = 0.34 there, against 0.11 for the flow interpolant).
    "diffusion": {"karras": "logsnr", "trailing": "logsnr"},
    # t is the noise level (EDM: sigma = t, up to 80) or its logarithm (VE): steps uniform in t are
    # the log-SNR spacing already (VE) or crowd the noisiest levels (EDM).
    "noise_level": {"uniform": "logsnr", "trailing": "logsnr"},
    # Log-SNR unbounded (the flow interpolant: infinite at t = 0 and 1) or far wider than the data
    # need (cosine table, sub-VP): log-SNR spacings crowd the steps at its ends. Uniform steps in t
    # suit these processes (Liu et al. 2023; Nichol & Dhariwal 2021); multistep solvers keep
    # "trailing", which spares them a last, short interval in t that is long in log-SNR.
    "uniform_time": {"logsnr": "uniform", "karras": "uniform", "edm": "uniform"},
}


def default_grid(solver, process) -> str:
    """The grid name :func:`difflax.sample` uses for ``solver`` on ``process`` when none is given.

    ``solver.default_grid`` unless :data:`DEFAULT_GRIDS` replaces it for ``process.grid_kind``
    (``"diffusion"`` for a process that does not declare one).
    """
    kind = getattr(process, "grid_kind", "diffusion")
    if kind not in DEFAULT_GRIDS:
        raise ValueError(
            f"process.grid_kind must be one of {', '.join(map(repr, DEFAULT_GRIDS))}; got {kind!r} "
            f"from {type(process).__name__}."
        )
    return DEFAULT_GRIDS[kind].get(solver.default_grid, solver.default_grid)


def get_solver(name: str, **kwargs) -> Solver | Adaptive:
    """Build the solver ``name`` with its hyper-parameters ``kwargs``."""
    if name not in SOLVERS:
        raise ValueError(f"Unknown solver {name!r}; expected one of {', '.join(map(repr, sorted(SOLVERS)))}.")
    try:
        return SOLVERS[name](**kwargs)
    except TypeError as err:
        raise TypeError(f"solver {name!r}: {err}") from None


def resolve_solver(solver, solver_args: dict) -> Solver | Adaptive:
    """A solver object from a registry name plus keywords, or the solver object itself."""
    if isinstance(solver, str):
        return get_solver(solver, **solver_args)
    if solver_args:
        raise ValueError("pass solver hyper-parameters either in the solver object or as keywords, not both.")
    if not hasattr(solver, "default_grid"):
        raise TypeError(f"solver must be a name from difflax.solvers.SOLVERS or a Solver; got {type(solver).__name__}.")
    return solver


def resolve_grid(grid, solver, process, steps: int, final_zero: bool | None = None) -> tuple[jax.Array, bool]:
    """``(ts, final_zero)`` from a grid name (default: :func:`default_grid`) or a user array."""
    if grid is None:
        grid = default_grid(solver, process)
    if isinstance(grid, str):
        final_zero = True if final_zero is None else final_zero
        return make_grid(grid, process, steps, final_zero=final_zero), final_zero
    ts, ends_in_zero = check_grid(grid, process)
    if final_zero is None:
        if ends_in_zero is None:
            raise ValueError("grid is a traced array: pass final_zero=True or False.")
        final_zero = ends_in_zero
    return ts, final_zero
