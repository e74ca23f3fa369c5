"""DDPM ancestral sampling and DDIM, in continuous time for any process.

Both are the transitions of :mod:`difflax.transitions` with ``x0 = D(x_s, s)``: between a
noisier time ``s`` and a cleaner time ``t`` (``h = lambda_t - lambda_s``,
``lambda = log(alpha / sigma)``) the posterior ``q(x_t | x_s, x0)`` has mean
``alpha_t x0 + sigma_t e^{-h} eps_s`` and variance ``sigma_t^2 (1 - e^{-2h})``, DDPM's
``beta~`` for a discrete VP table (Kingma et al. 2021, eq. 7-8).

* :class:`DDIM` (Song et al. 2021, eq. 12):
  ``x_t = alpha_t x0 + sqrt(sigma_t^2 - c^2) eps_s + c z`` with
  ``c = eta sigma_t sqrt(1 - e^{-2h})``; ``eta = 0`` is the deterministic sampler (the
  first-order exponential integrator of the probability-flow ODE), ``eta = 1`` is
  ancestral sampling with ``beta~``.
* :class:`DDPM` (Ho et al. 2020, alg. 2): the posterior mean with variance ``beta~``
  (``variance="beta_tilde"``) or the forward-step variance
  ``beta = sigma_s^2 (1 - e^{-2h})`` (``variance="beta"``).

Both evaluate the denoiser once per step.
"""

from __future__ import annotations

import jax

from difflax import pytree
from difflax.checks import check_choice
from difflax.solvers.base import Solver, Step, call
from difflax.transitions import coefficients, ddim_step, eps_from_x0, forward_std, posterior_mean, posterior_std

__all__ = ["DDIM", "DDPM"]


@pytree.dataclass
class DDIM(Solver):
    """Denoising diffusion implicit models (Song et al. 2021) with stochasticity ``eta`` (traced)."""

    eta: float = 0.0
    default_grid = "uniform"

    @property
    def stochastic(self) -> bool:
        """Needs a key unless ``eta`` is a concrete zero."""
        try:
            return float(self.eta) != 0.0
        except (TypeError, jax.errors.ConcretizationTypeError):
            return True

    def step(self, denoise, process, x, state, step: Step):
        s, c = coefficients(process, step.t), coefficients(process, step.t_next)
        x0 = call(denoise, x, step.t)
        if step.key is None:  # eta is a concrete 0 (run checks the key)
            return ddim_step(x0, eps_from_x0(x, x0, s), c).astype(x.dtype), state
        std = self.eta * posterior_std(s, c)
        out = ddim_step(x0, eps_from_x0(x, x0, s), c, std)
        return (out + std * jax.random.normal(step.key, x.shape, x.dtype)).astype(x.dtype), state


@pytree.dataclass
class DDPM(Solver):
    """Ancestral sampling of Ho et al. 2020 with ``variance`` ``"beta_tilde"`` or ``"beta"`` (static)."""

    variance: str = pytree.field(static=True, default="beta_tilde")
    stochastic = True
    default_grid = "uniform"

    def __post_init__(self):
        check_choice(self.variance, ("beta_tilde", "beta"), "variance")

    def step(self, denoise, process, x, state, step: Step):
        s, c = coefficients(process, step.t), coefficients(process, step.t_next)
        x0 = call(denoise, x, step.t)
        mean = posterior_mean(x0, eps_from_x0(x, x0, s), s, c)
        std = posterior_std(s, c) if self.variance == "beta_tilde" else forward_std(s, c)
        return (mean + std * jax.random.normal(step.key, x.shape, x.dtype)).astype(x.dtype), state
