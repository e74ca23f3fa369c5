"""difflax: diffusion and flow models in JAX.

The core (processes, parametrizations, losses, solvers, guidance, likelihood and the
exact Gaussian-mixture denoisers) is pure JAX: every function jits, vmaps, grads and
shards, and composes with any model through the denoiser contract
``denoise(x_t, t) -> x0_hat``.
"""

from difflax import analytic, distill, guidance, likelihood, losses, parametrization, processes, solvers
from difflax.parametrization import Denoiser, as_denoiser, convert, denoiser_to
from difflax.processes import EDM, VE, VP, DiscreteVP, Flow, SubVP
from difflax.solvers import make_grid, picard_sample, sample, speculative_sample

__version__ = "0.1.0"

__all__ = [
    "EDM",
    "VE",
    "VP",
    "Denoiser",
    "DiscreteVP",
    "Flow",
    "SubVP",
    "analytic",
    "as_denoiser",
    "convert",
    "denoiser_to",
    "distill",
    "guidance",
    "likelihood",
    "losses",
    "make_grid",
    "parametrization",
    "picard_sample",
    "processes",
    "sample",
    "solvers",
    "speculative_sample",
]
