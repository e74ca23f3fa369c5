"""Euler and Heun on the probability-flow ODE, and the stochastic EDM sampler.

The probability-flow ODE of ``x_t = alpha x0 + sigma eps`` (Song et al. 2021, eq. 13)
has drift ``dx/dt = alpha' x0_hat + sigma' eps_hat``, the velocity of the
``parametrization`` module, in the process's own time. For the EDM process
(``sigma = t``) this is ``(x - D(x; t)) / t`` and :class:`Heun` is algorithm 1 of
Karras et al. 2022 (its last step to ``t = 0`` is the Euler step, i.e. the final
denoising step of the sampler); for the flow interpolant :class:`Euler` is the usual
rectified-flow sampler.

:class:`EDMStochastic` is algorithm 2 of Karras et al. 2022: before each Heun step the
noise level is raised from ``sigma`` to ``sigma_hat = sigma (1 + gamma)`` with
``gamma = min(S_churn / N, sqrt(2) - 1)`` inside ``[S_tmin, S_tmax]`` by adding
``sqrt(sigma_hat^2 - sigma^2) S_noise z = sigma sqrt(gamma (2 + gamma)) S_noise z`` (the
second form is exactly 0 without churn, so ``s_churn = 0`` is :class:`Heun`). ``N`` is the
number of grid intervals, the last step to ``sigma = 0`` included, and that last step churns
too when its level lies in the range (Algorithm 2's loop runs to ``i = N - 1``); it is then
the Euler step from ``sigma_hat``, i.e. ``D(x_hat, sigma_hat)``. For a process with
``alpha != 1`` the churn acts on the scaled noise level ``sigma / alpha`` and the scaled
sample ``x / alpha``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from difflax import pytree
from difflax.solvers.base import Solver, Step, call, first_stage_picks, staged_step

__all__ = ["EDMStochastic", "Euler", "Heun", "velocity"]


def velocity(denoise, process, x, t):
    """Probability-flow ODE drift ``alpha'(t) x0_hat + sigma'(t) eps_hat`` at scalar ``t``."""
    x0 = call(denoise, x, t)
    alpha, sigma = process.alpha_sigma(t)
    d_alpha, d_sigma = process.alpha_sigma_derivatives(t)
    return d_alpha * x0 + d_sigma * (x - alpha * x0) / sigma


@pytree.dataclass
class Euler(Solver):
    """Explicit Euler on the probability-flow ODE in process time (first order, 1 NFE per step)."""

    default_grid = "karras"

    def step(self, denoise, process, x, state, step: Step):
        return (x + (step.t_next - step.t) * velocity(denoise, process, x, step.t)).astype(x.dtype), state


@pytree.dataclass
class Heun(Solver):
    """Heun's method (explicit trapezoid) on the probability-flow ODE: second order, 2 NFE per step.

    Staged (:class:`~difflax.solvers.base.Solver`): stage 0 evaluates ``d = v(x, t)`` and moves to
    the Euler point ``x_e = x + h d``; stage 1 evaluates ``d' = v(x_e, t_next)`` and finishes
    ``x + h (d + d') / 2 = (x + x_e) / 2 + h d' / 2``. The state is the stage's starting point
    (stage 1 reads stage 0's), so a stage writes one array beside ``x``.
    """

    evals_per_step = 2
    default_grid = "karras"
    staged = True

    def init(self, process, x):
        return jnp.zeros_like(x)  # the previous stage's starting point

    def stage(self, denoise, process, x, start, step: Step):
        pick = first_stage_picks(step)
        h = step.t_next - step.t
        d = velocity(denoise, process, x, pick(step.t, step.t_next))
        return pick(x + h * d, 0.5 * (start + x) + 0.5 * h * d).astype(x.dtype), pick(x, start)

    def step(self, denoise, process, x, state, step: Step):
        return staged_step(self, denoise, process, x, state, step)


@pytree.dataclass
class EDMStochastic(Solver):
    """Karras et al. 2022, algorithm 2 (defaults: their ImageNet-64 settings are 40/0.05/50/1.003).

    ``s_churn``, ``s_tmin``, ``s_tmax`` and ``s_noise`` are traced. ``churn_final`` (static,
    default ``True`` as in Algorithm 2) also churns before the final denoising step, which is
    then the step's first evaluation ``D(x_hat, t_hat)`` (:meth:`Solver.advance`);
    ``False`` denoises from ``sigma_min`` directly, as difflax did before.
    """

    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0
    churn_final: bool = pytree.field(static=True, default=True)
    evals_per_step = 2
    default_grid = "karras"
    stochastic = True
    staged = True

    def _churn(self, process, x, step: Step):
        """``(x_hat, t_hat)``: ``x`` raised from ``sigma`` to ``sigma (1 + gamma)`` in the scaled coordinates;
        exactly ``(x, t)`` where ``gamma = 0`` (no churn, or ``churn_final=False`` on the final step)."""
        alpha, sigma = process.alpha_sigma(step.t)
        level = sigma / alpha
        churn = (level >= self.s_tmin) & (level <= self.s_tmax)
        if not self.churn_final:
            churn = churn & jnp.logical_not(step.final)
        gamma = jnp.where(churn, jnp.minimum(self.s_churn / step.num_steps, jnp.sqrt(2.0) - 1.0), 0.0)
        raised = gamma > 0
        # Where gamma = 0 the churned branch is never taken; keep it finite (alpha = 0 at the Flow's t = 1).
        safe_level = jnp.where(raised, level, 1.0)
        t_hat = jnp.where(raised, process.t_from_log_snr(-2.0 * jnp.log(safe_level * (1.0 + gamma))), step.t)
        alpha_hat = process.alpha(t_hat)
        z = jax.random.normal(step.key, x.shape, x.dtype)
        noise = safe_level * jnp.sqrt(gamma * (2.0 + gamma)) * self.s_noise * z
        x_hat = ((alpha_hat / jnp.where(raised, alpha, 1.0)) * x + alpha_hat * noise).astype(x.dtype)
        return jnp.where(raised, x_hat, x), t_hat

    def init(self, process, x):
        # Heun's state and the churned time t_hat of stage 0, for stage 1.
        return Heun().init(process, x), jnp.zeros((), jnp.result_type(x.dtype, jnp.float32))

    def stage(self, denoise, process, x, state, step: Step):
        start, t_hat = state
        if not isinstance(step.stage, int) or step.stage == 0:  # stage 1 of a whole step churns nothing
            pick = first_stage_picks(step)
            x_hat, t_churned = self._churn(process, x, step)
            x, t_hat = pick(x_hat, x), pick(t_churned, t_hat).astype(t_hat.dtype)
        x, start = Heun().stage(denoise, process, x, start, step._replace(t=t_hat))
        return x, (start, t_hat)

    def step(self, denoise, process, x, state, step: Step):
        return staged_step(self, denoise, process, x, state, step)
