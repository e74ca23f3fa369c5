"""DDPM ancestral sampling and DDIM, in continuous time for any process.

Between a noisier time ``s`` and a cleaner time ``t`` write ``h = lambda_t - lambda_s``
with ``lambda = log(alpha / sigma)``. The posterior ``q(x_t | x_s, x0)`` has mean
``alpha_t x0 + sigma_t e^{-h} eps_s`` and variance ``sigma_t^2 (1 - e^{-2h})``, where
``eps_s = (x_s - alpha_s x0) / sigma_s`` (Kingma et al. 2021, eq. 7-8, rewritten in
``lambda``; for a discrete VP table this is DDPM's ``beta~``).

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
import jax.numpy as jnp
from flax import struct

from difflax.solvers.base import SolverState, call, coefficients, eps_from_x0, exp_neg_h, init_state

__all__ = ["DDIM", "DDPM"]


def _posterior_parts(denoise, process, state: SolverState, t, t_next):
    s, c = coefficients(process, t), coefficients(process, t_next)
    x0 = call(denoise, state.x, t)
    eps = eps_from_x0(state.x, x0, s)
    ratio = exp_neg_h(s, c)  # e^{-h}
    one_minus = -jnp.expm1(2.0 * jnp.log(ratio))  # 1 - e^{-2h}
    return s, c, x0, eps, ratio, one_minus


@struct.dataclass
class DDIM:
    """Denoising diffusion implicit models (Song et al. 2021) with stochasticity ``eta`` (traced)."""

    eta: float = 0.0

    @property
    def stochastic(self) -> bool:
        """Needs a key unless ``eta`` is a concrete zero."""
        try:
            return float(self.eta) != 0.0
        except (TypeError, jax.errors.ConcretizationTypeError):
            return True

    def init(self, process, x, key, num_steps):
        return init_state(x, key)

    def step(self, denoise, process, state: SolverState, t, t_next) -> SolverState:
        _, c, x0, eps, _, one_minus = _posterior_parts(denoise, process, state, t, t_next)
        std = self.eta * c.sigma * jnp.sqrt(one_minus)
        x = c.alpha * x0 + jnp.sqrt(jnp.maximum(c.sigma**2 - std**2, 0.0)) * eps
        if state.key is not None:  # without a key eta is a concrete 0 (checked by sample)
            state, sub = state.next_key()
            x = x + std * jax.random.normal(sub, x.shape, x.dtype)
        return state.replace(x=x, nfe=state.nfe + 1, step=state.step + 1)


@struct.dataclass
class DDPM:
    """Ancestral sampling of Ho et al. 2020 with ``variance`` ``"beta_tilde"`` or ``"beta"`` (static)."""

    variance: str = struct.field(pytree_node=False, default="beta_tilde")
    stochastic = True

    def __post_init__(self):
        if self.variance not in ("beta_tilde", "beta"):
            raise ValueError(f"variance must be 'beta_tilde' or 'beta'; got {self.variance!r}.")

    def init(self, process, x, key, num_steps):
        return init_state(x, key)

    def step(self, denoise, process, state: SolverState, t, t_next) -> SolverState:
        s, c, x0, eps, ratio, one_minus = _posterior_parts(denoise, process, state, t, t_next)
        mean = c.alpha * x0 + c.sigma * ratio * eps
        var = (c.sigma if self.variance == "beta_tilde" else s.sigma) ** 2 * one_minus
        state, sub = state.next_key()
        x = mean + jnp.sqrt(var) * jax.random.normal(sub, mean.shape, mean.dtype)
        return state.replace(x=x, nfe=state.nfe + 1, step=state.step + 1)
