"""Samplers: every solver as pure ``init`` / ``step`` functions, driven by one ``lax.scan``.

>>> x0, info = difflax.sample(denoise, process, x_T, solver="dpmpp_2m", steps=10, grid="logsnr")

Solvers are immutable configs deriving from :class:`Solver` (:mod:`difflax.solvers.base`);
:data:`SOLVERS` maps names to them and :func:`get_solver` builds one from a name and
keyword arguments. Samplers that act between steps are solver -> solver wrappers run by
the same loop (:class:`ReplaceKnown` for inpainting and RePaint, :class:`DPS`); the
parallel samplers (:func:`picard_sample`, :func:`speculative_sample`) run their own rounds.
"""

from difflax.solvers import grids
from difflax.solvers.adaptive import Adaptive
from difflax.solvers.ancestral import DDIM, DDPM
from difflax.solvers.base import Solver, Step, run
from difflax.solvers.deis import DEIS
from difflax.solvers.dpm import DPMSolver, DPMSolverPP2M, DPMSolverPP2MSDE, DPMSolverPP2S, DPMSolverPP3M
from difflax.solvers.dps import DPS, dps_sample
from difflax.solvers.edm_coordinates import to_edm
from difflax.solvers.epd import EPD, fit_epd
from difflax.solvers.grids import GRIDS, check_grid, make_grid
from difflax.solvers.inpainting import ReplaceKnown, inpaint_sample, repaint_moves
from difflax.solvers.ipndm import IPNDM
from difflax.solvers.learned import LearnedGrid, fit_ld3
from difflax.solvers.ode import EDMStochastic, Euler, Heun
from difflax.solvers.optimize import optimize_grid
from difflax.solvers.picard import picard_sample
from difflax.solvers.registry import SOLVERS, get_solver, resolve_grid, resolve_solver
from difflax.solvers.sample import sample, sdedit
from difflax.solvers.sde import ALD, PC, EulerMaruyama
from difflax.solvers.serialize import from_arrays, to_arrays
from difflax.solvers.speculative import reflection_coupling, speculative_sample
from difflax.solvers.unipc import UniPC

__all__ = [
    "ALD",
    "DDIM",
    "DDPM",
    "DEIS",
    "DPS",
    "EPD",
    "GRIDS",
    "IPNDM",
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
    "LearnedGrid",
    "ReplaceKnown",
    "Solver",
    "Step",
    "UniPC",
    "check_grid",
    "dps_sample",
    "fit_epd",
    "fit_ld3",
    "from_arrays",
    "get_solver",
    "grids",
    "inpaint_sample",
    "make_grid",
    "optimize_grid",
    "picard_sample",
    "reflection_coupling",
    "repaint_moves",
    "resolve_grid",
    "resolve_solver",
    "run",
    "sample",
    "sdedit",
    "speculative_sample",
    "to_arrays",
    "to_edm",
]
