"""DPM-Solver and DPM-Solver++: exponential integrators of the probability-flow ODE in ``lambda``.

Notation (as in the papers): ``lambda = log(alpha / sigma)`` is *half* the log-SNR,
``h = lambda_t - lambda_s > 0`` is the step from the noisier time ``s`` to the cleaner
time ``t``, ``eps_hat = (x - alpha x0_hat) / sigma`` and ``x0_hat = D(x, t)``. With the
``phi`` functions ``phi_1(z) = (e^z - 1) / z``, ``phi_{k+1}(z) = (phi_k(z) - 1/k!) / z``
the probability-flow ODE has the exact "variation of constants" solutions

* noise form (Lu et al. 2022a, eq. 3.4):
  ``x_t = (alpha_t / alpha_s) x_s - alpha_t int_{lambda_s}^{lambda_t} e^{-lambda} eps_hat dlambda``,
* data form (Lu et al. 2022b, eq. 8):
  ``x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^{lambda} x0_hat dlambda``,

and the solvers below replace the integrand by low-order expansions in ``lambda``.

:class:`DPMSolver` -- singlestep DPM-Solver-1/2/3 (Lu et al. 2022, "DPM-Solver: A fast ODE
solver for diffusion probabilistic model sampling in around 10 steps", NeurIPS), noise
prediction, ``order`` evaluations per step:

* order 1 (= DDIM): ``x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps_s``.
* order 2 (Algorithm 1, ``r1 = 1/2``): ``s1 = t_lambda(lambda_s + r1 h)``,
  ``u = (alpha_s1 / alpha_s) x_s - sigma_s1 (e^{r1 h} - 1) eps_s``,
  ``x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps_s
  - sigma_t / (2 r1) (e^h - 1) (eps(u, s1) - eps_s)``.
* order 3 (Algorithm 2, ``r1 = 1/3``, ``r2 = 2/3``):
  ``u1 = (alpha_s1 / alpha_s) x_s - sigma_s1 (e^{r1 h} - 1) eps_s``,
  ``D1 = eps(u1, s1) - eps_s``,
  ``u2 = (alpha_s2 / alpha_s) x_s - sigma_s2 (e^{r2 h} - 1) eps_s
  - (sigma_s2 r2 / r1) ((e^{r2 h} - 1) / (r2 h) - 1) D1``,
  ``D2 = eps(u2, s2) - eps_s``,
  ``x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps_s - (sigma_t / r2) ((e^h - 1) / h - 1) D2``.

:class:`DPMSolverPP2S` -- DPM-Solver++(2S) (Lu et al. 2022b, "DPM-Solver++: Fast solver for
guided sampling of diffusion probabilistic models", Algorithm 1 with ``r = 1/2``), data
prediction, 2 evaluations per step:
``u = (sigma_u / sigma_s) x_s - alpha_u (e^{-r h} - 1) x0_s``,
``D = (1 - 1/(2r)) x0_s + 1/(2r) x0(u, s_u)``,
``x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D``.

:class:`DPMSolverPP2M` -- DPM-Solver++(2M) (ibid., Algorithm 2), multistep, 1 evaluation
per step; with the previous step ``h_prev`` and ``r0 = h_prev / h`` (the "midpoint" form
of diffusers' ``DPMSolverMultistepScheduler``, ``algorithm_type="dpmsolver++"``):
``D1 = (D0 - D_prev) / r0``,
``x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) (D0 + D1 / 2)``.
The first step is first order.

:class:`DPMSolverPP3M` -- the third-order multistep DPM-Solver++ of the reference code
(dpm-solver repository, diffusers, k-diffusion): with ``r0 = h_0 / h``, ``r1 = h_1 / h``,
``D1_0 = (D0 - D_{-1}) / r0``, ``D1_1 = (D_{-1} - D_{-2}) / r1``,
``D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1)``, ``D2 = (D1_0 - D1_1) / (r0 + r1)``
(so that ``D1 ~ h x0'`` and ``D2 ~ h^2 x0'' / 2`` in ``lambda``),
``x_t = (sigma_t / sigma_s) x_s + alpha_t [h phi_1(-h) D0 + h phi_2(-h) D1 + c h phi_3(-h) D2]``.
The exact integral of the quadratic Taylor polynomial has ``c = 2``
(``variant="third_order"``, the default, third order); the reference implementations use
``c = 1`` (``variant="diffusers"``), which integrates a quadratic ``x0_hat(lambda)``
inexactly and is formally second order; the halved term also damps the extrapolation
(the solver benchmark compares the two). Warm-up with orders 1 and 2.

:class:`DPMSolverPP2MSDE` -- SDE-DPM-Solver++(2M), the reverse-SDE counterpart of 2M as the
DPM-Solver authors implemented it in diffusers (``algorithm_type="sde-dpmsolver++"``,
midpoint rule):
``x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) (D0 + D1 / 2)
+ sigma_t sqrt(1 - e^{-2h}) s_noise z``; its first-order step (``D1 = 0``) is ancestral
sampling with the posterior variance (DDIM with ``eta = 1``).

Multistep solvers lower their order like diffusers: ``min(order, step + 1)`` during
warm-up and, with ``lower_order_final`` when the grid has fewer than 15 intervals, at
the end (first order on the last interval, second order on the one before it for 3M);
the final denoising step ``D(x, t_min)`` of :func:`difflax.solvers.base.run` *is* the
first-order step to ``sigma = 0``.

All formulas are evaluated in forms that stay finite when ``alpha_s = 0`` (the flow
interpolant at ``t = 1``, ``lambda_s = -inf``): ``(alpha_t / alpha_s) x_s - sigma_t (e^h - 1)
eps_s`` is computed as ``alpha_t x0_s + sigma_t eps_s`` (identical for ``eps_s`` derived
from ``x0_s``), step ratios ``1 / r = h / h_prev`` vanish for an infinite previous step,
and the noise-prediction corrections of :class:`DPMSolver`, whose coefficients ``~e^h`` are
infinite there while the differences they multiply are exactly zero (the intermediate
points coincide with ``x_s``), are dropped: that one step is DDIM, the limit of the
method. The time arguments are promoted to the precision of ``x``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from difflax import pytree
from difflax.checks import check_choice
from difflax.solvers.base import Solver, Step, call
from difflax.solvers.exponential import (
    History,
    finite_or_zero,
    intermediate,
    promote_time,
    select_by_order,
    step_size,
    zphi,
)
from difflax.transitions import coefficients, eps_from_x0

__all__ = ["DPMSolver", "DPMSolverPP2M", "DPMSolverPP2MSDE", "DPMSolverPP2S", "DPMSolverPP3M"]


def _ends(process, x, step: Step):
    return coefficients(process, promote_time(step.t, x)), coefficients(process, promote_time(step.t_next, x))


# ---------------------------------------------------------------------------------------- singlestep
@pytree.dataclass
class DPMSolver(Solver):
    """Singlestep DPM-Solver-``order`` (Lu et al. 2022, noise prediction); ``order`` in {1, 2, 3}, static.

    ``order`` denoiser evaluations per step; order 1 is DDIM.
    """

    order: int = pytree.field(static=True, default=3)

    def __post_init__(self):
        check_choice(self.order, (1, 2, 3), "dpm_solver order")

    @property
    def evals_per_step(self) -> int:
        return self.order

    def step(self, denoise, process, x, state, step: Step):
        s, c = _ends(process, x, step)
        h = step_size(s, c)
        x0 = call(denoise, x, s.t)
        eps = eps_from_x0(x, x0, s)
        out = c.alpha * x0 + c.sigma * eps  # = (alpha_t / alpha_s) x - sigma_t (e^h - 1) eps
        if self.order == 2:
            r1 = 0.5
            u = intermediate(process, s, c, h, r1)
            x_u = u.alpha * x0 + u.sigma * eps
            d1 = eps_from_x0(x_u, call(denoise, x_u, u.t), u) - eps
            out = out - finite_or_zero(c.sigma * zphi(1, h) / (2.0 * r1)) * d1
        elif self.order == 3:
            r1, r2 = 1.0 / 3.0, 2.0 / 3.0
            u1 = intermediate(process, s, c, h, r1)
            x_u1 = u1.alpha * x0 + u1.sigma * eps
            d1 = eps_from_x0(x_u1, call(denoise, x_u1, u1.t), u1) - eps
            u2 = intermediate(process, s, c, h, r2)
            x_u2 = u2.alpha * x0 + u2.sigma * eps - finite_or_zero(u2.sigma * (r2 / r1) * zphi(2, r2 * h)) * d1
            d2 = eps_from_x0(x_u2, call(denoise, x_u2, u2.t), u2) - eps
            out = out - finite_or_zero(c.sigma / r2 * zphi(2, h)) * d2
        return out.astype(x.dtype), state


@pytree.dataclass
class DPMSolverPP2S(Solver):
    """DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1, ``r = 1/2``): data prediction, 2 evaluations per step."""

    evals_per_step = 2

    def step(self, denoise, process, x, state, step: Step):
        r = 0.5
        s, c = _ends(process, x, step)
        h = step_size(s, c)
        x0 = call(denoise, x, s.t)
        u = intermediate(process, s, c, h, r)
        x_u = (u.sigma / s.sigma) * x - u.alpha * zphi(1, -step_size(s, u)) * x0
        d = (1.0 - 0.5 / r) * x0 + (0.5 / r) * call(denoise, x_u, u.t)
        out = (c.sigma / s.sigma) * x - c.alpha * zphi(1, -h) * d
        return out.astype(x.dtype), state


# ---------------------------------------------------------------------------------------- multistep
def multistep_order(order: int, lower_order_final: bool, history: History, step: Step):
    """Order of this step: what the history supports once this step's output is pushed
    (``min(order, filled)``); with ``lower_order_final`` and fewer than 15 intervals also
    ``<= intervals - index`` (diffusers' ``lower_order_final`` / ``lower_order_second``)."""
    now = history.order(order)
    if lower_order_final:
        now = jnp.where(step.num_steps < 15, jnp.minimum(now, step.num_steps - step.index), now)
    return now


class _DPMSolverPPMultistep(Solver):
    """Shared ``init`` / ``step`` of the multistep data-prediction solvers (a base of the dataclasses below).

    The state is the :class:`History` of ``x0_hat`` at the last ``lambda`` nodes.
    """

    order: int
    lower_order_final: bool
    default_grid = "trailing"  # on diffusion and noise-level processes: logsnr (registry.DEFAULT_GRIDS)

    def _d2_factor(self):
        return 2.0

    def init(self, process, x):
        return History.empty(max(self.order - 1, 1), x)

    def step(self, denoise, process, x, hist: History, step: Step):
        s, c = _ends(process, x, step)
        h = step_size(s, c)
        x0 = call(denoise, x, s.t)
        hist = hist.push(x0, s.lam)  # first: the earlier outputs are read from the pushed history
        order_now = multistep_order(self.order, self.lower_order_final, hist, step)

        # 1 / r0 = h / h_0 with h_0 = lambda_s - lambda_{-1} (0 if h_0 is infinite).
        use2 = order_now >= 2
        h0 = jnp.where(use2, s.lam - hist.node(1), 1.0)
        q0 = jnp.where(use2, h / h0, 0.0)
        d1_0 = q0 * (x0 - hist.value(1))  # diffusers' D1 (2M) and D1_0 (3M)

        if self.stochastic:
            decay = jnp.exp(-h)  # e^{-h}, 0 for an infinite step
            gain = -jnp.expm1(-2.0 * h)  # 1 - e^{-2h}
            drift = (c.sigma / s.sigma) * decay * x + c.alpha * gain * (x0 + 0.5 * d1_0)
            z = jax.random.normal(step.key, x.shape, x.dtype)
            out = drift + c.sigma * jnp.sqrt(gain) * self.s_noise * z
        elif self.order == 2:
            out = (c.sigma / s.sigma) * x - c.alpha * zphi(1, -h) * (x0 + 0.5 * d1_0)
        else:
            use3 = order_now >= 3
            h1 = jnp.where(use3, hist.node(1) - hist.node(2), 1.0)
            q1 = jnp.where(use3, h / h1, 0.0)  # 1 / r1
            d1_1 = q1 * (hist.value(1) - hist.value(2))
            qsum = jnp.where(use3, q0 + q1, 1.0)
            w = q1 / qsum  # r0 / (r0 + r1)
            v = q0 * q1 / qsum  # 1 / (r0 + r1)
            a1 = -zphi(1, -h)  # h phi_1(-h) = 1 - e^{-h}
            a2 = -zphi(2, -h)  # h phi_2(-h)
            a3 = -zphi(3, -h) * self._d2_factor()  # c h phi_3(-h)
            # x_t = (sigma_t/sigma_s) x + alpha_t [a1 D0 + a2 D1 + a3 D2]
            # with D1 = D1_0 + w (D1_0 - D1_1) and D2 = v (D1_0 - D1_1).
            k0 = select_by_order(order_now, [0.0, 0.5 * a1, a2 * (1.0 + w) + a3 * v])
            k1 = select_by_order(order_now, [0.0, 0.0, -(a2 * w + a3 * v)])
            out = (c.sigma / s.sigma) * x + c.alpha * (a1 * x0 + k0 * d1_0 + k1 * d1_1)
        return out.astype(x.dtype), hist


@pytree.dataclass
class DPMSolverPP2M(_DPMSolverPPMultistep):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): multistep, second order, 1 evaluation per step.

    Step for step the "midpoint" 2M of diffusers' ``DPMSolverMultistepScheduler``
    (``algorithm_type="dpmsolver++"``, ``solver_order=2``), including ``lower_order_final``.
    """

    lower_order_final: bool = pytree.field(static=True, default=True)
    order = 2


@pytree.dataclass
class DPMSolverPP3M(_DPMSolverPPMultistep):
    """Third-order multistep DPM-Solver++ (warm-up with orders 1, 2); 1 evaluation per step.

    ``variant="third_order"`` integrates the quadratic interpolant of ``x0_hat(lambda)``
    exactly; ``variant="diffusers"`` uses the ``D2`` coefficient of the reference code
    (half of that; see the module docstring).
    """

    lower_order_final: bool = pytree.field(static=True, default=True)
    variant: str = pytree.field(static=True, default="third_order")
    order = 3

    def __post_init__(self):
        check_choice(self.variant, ("third_order", "diffusers"), "dpmpp_3m variant")

    def _d2_factor(self):
        return 2.0 if self.variant == "third_order" else 1.0


@pytree.dataclass
class DPMSolverPP2MSDE(_DPMSolverPPMultistep):
    """SDE-DPM-Solver++(2M) (diffusers' ``"sde-dpmsolver++"``, midpoint); ``s_noise`` (traced) scales the noise."""

    s_noise: float = 1.0
    lower_order_final: bool = pytree.field(static=True, default=True)
    order = 2
    stochastic = True
