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
inexactly and is formally second order. The halved term also damps the extrapolation: at
small step counts (8-50 steps on a Gaussian mixture, with the final denoising step) the
"diffusers" variant was 10-40% more accurate; the exact variant wins asymptotically.
Warm-up with orders 1 and 2.

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

import math

import jax
import jax.numpy as jnp
from flax import struct

from difflax.solvers.base import Coefficients, SolverState, call, coefficients, eps_from_x0, init_state

__all__ = ["DPMSolver", "DPMSolverPP2M", "DPMSolverPP2MSDE", "DPMSolverPP2S", "DPMSolverPP3M"]

# ---------------------------------------------------------------------------------------- helpers
# Below this |z| the phi functions use their Taylor series (the recursion cancels).
_SERIES_BELOW = 0.5
_SERIES_TERMS = 18


def promote_time(t, x):
    """``t`` as an array of at least the floating precision of ``x``."""
    t = jnp.asarray(t)
    return t.astype(jnp.result_type(t.dtype, x.dtype, jnp.float32))


def step_size(s: Coefficients, t: Coefficients):
    """``h = lambda_t - lambda_s``; 0 between points of equal ``lambda`` (also both ``-inf``)."""
    same = s.lam == t.lam
    return jnp.where(same, jnp.zeros_like(t.lam), t.lam - jnp.where(same, jnp.zeros_like(s.lam), s.lam))


def phi(k: int, z):
    """``phi_k(z) = sum_j z^j / (j + k)!`` for scalar ``z`` in ``[-inf, inf)``, stable near 0.

    ``phi_1(z) = (e^z - 1) / z``, ``phi_{k+1}(z) = (phi_k(z) - 1/k!) / z``; ``phi_k(-inf) = 0``.
    """
    z = jnp.asarray(z)
    small = jnp.abs(z) < _SERIES_BELOW
    zr = jnp.where(small, jnp.ones_like(z), z)
    rec = jnp.expm1(zr) / zr
    for j in range(1, k):
        rec = (rec - 1.0 / math.factorial(j)) / zr
    zs = jnp.where(small, z, jnp.zeros_like(z))
    series = jnp.zeros_like(z)
    for j in reversed(range(_SERIES_TERMS)):
        series = series * zs + 1.0 / math.factorial(j + k)
    return jnp.where(small, series, rec)


def zphi(k: int, z):
    """``z phi_k(z)`` (``= e^z - 1`` for ``k = 1``, ``phi_{k-1}(z) - 1/(k-1)!`` otherwise), stable and
    finite at ``z = -inf``; the ``h phi_k(-h)`` of the data-prediction solvers is ``-zphi(k, -h)``."""
    z = jnp.asarray(z)
    if k == 1:
        return jnp.expm1(z)
    small = jnp.abs(z) < _SERIES_BELOW
    return jnp.where(small, z * phi(k, jnp.where(small, z, 0.0)), phi(k - 1, z) - 1.0 / math.factorial(k - 1))


def finite_or_zero(c):
    """A step coefficient, replaced by 0 where it is not finite (see the module docstring)."""
    return jnp.where(jnp.isfinite(c), c, jnp.zeros_like(c))


def intermediate(process, s: Coefficients, t: Coefficients, h, r: float) -> Coefficients:
    """Coefficients at ``lambda_s + r h`` (written ``lambda_t - (1 - r) h``, finite-safe for ``lambda_s = -inf``)."""
    lam = t.lam - (1.0 - r) * h
    finite = jnp.isfinite(lam)
    tu = process.t_from_log_snr(2.0 * jnp.where(finite, lam, t.lam))
    return coefficients(process, jnp.where(finite, tu, s.t).astype(s.t.dtype))


def select_by_order(order_now, values):
    """``values[order_now - 1]`` for a traced order (scalars only, so no NaN leaks into gradients)."""
    out = values[0]
    for k, v in enumerate(values[1:], start=2):
        out = jnp.where(order_now == k, v, out)
    return out


def check_order(order, allowed, name):
    if not isinstance(order, int) or isinstance(order, bool) or order not in allowed:
        raise ValueError(f"{name}: order must be one of {sorted(allowed)}; got {order!r}.")


def shift_in(hist, new):
    """Prepend ``new`` to the newest-first history ``hist`` (fixed length)."""
    return jnp.concatenate([new[None].astype(hist.dtype), hist[:-1]], axis=0)


# ---------------------------------------------------------------------------------------- DPM-Solver
@struct.dataclass
class DPMSolver:
    """Singlestep DPM-Solver-``order`` (Lu et al. 2022, noise prediction); ``order`` in {1, 2, 3}, static.

    ``order`` denoiser evaluations per step; order 1 is DDIM.
    """

    order: int = struct.field(pytree_node=False, default=3)
    stochastic = False

    def __post_init__(self):
        check_order(self.order, (1, 2, 3), "dpm_solver")

    def init(self, process, x, key, num_steps):
        return init_state(x, key)

    def step(self, denoise, process, state: SolverState, t, t_next) -> SolverState:
        x = state.x
        s, c = coefficients(process, promote_time(t, x)), coefficients(process, promote_time(t_next, x))
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
        return state.replace(x=out.astype(x.dtype), nfe=state.nfe + self.order, step=state.step + 1)


@struct.dataclass
class DPMSolverPP2S:
    """DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1, ``r = 1/2``): data prediction, 2 evaluations per step."""

    stochastic = False
    order = 2

    def init(self, process, x, key, num_steps):
        return init_state(x, key)

    def step(self, denoise, process, state: SolverState, t, t_next) -> SolverState:
        r = 0.5
        x = state.x
        s, c = coefficients(process, promote_time(t, x)), coefficients(process, promote_time(t_next, x))
        h = step_size(s, c)
        x0 = call(denoise, x, s.t)
        u = intermediate(process, s, c, h, r)
        x_u = (u.sigma / s.sigma) * x - u.alpha * zphi(1, -step_size(s, u)) * x0
        d = (1.0 - 0.5 / r) * x0 + (0.5 / r) * call(denoise, x_u, u.t)
        out = (c.sigma / s.sigma) * x - c.alpha * zphi(1, -h) * d
        return state.replace(x=out.astype(x.dtype), nfe=state.nfe + 2, step=state.step + 1)


# ---------------------------------------------------------------------------------------- multistep DPM-Solver++
def _multistep_order(order: int, lower_order_final: bool, state: SolverState):
    """Order of this step: ``min(order, step + 1)``; with ``lower_order_final`` and fewer than 15
    intervals also ``<= intervals - step`` (diffusers' ``lower_order_final`` / ``lower_order_second``)."""
    now = jnp.minimum(order, state.step + 1)
    if lower_order_final:
        n = state.extra["num_steps"]
        now = jnp.where(n < 15, jnp.minimum(now, n - state.step), now)
    return now


class _DPMSolverPPMultistep:
    """Shared ``init`` / ``step`` of the multistep data-prediction solvers (a mixin of the dataclasses below)."""

    order: int
    lower_order_final: bool
    stochastic = False

    def _d2_factor(self):
        return 2.0

    def init(self, process, x, key, num_steps):
        n_hist = max(self.order - 1, 1)
        extra = {
            "x0": jnp.zeros((n_hist, *x.shape), x.dtype),
            "lam": jnp.zeros((n_hist,), jnp.result_type(x.dtype, jnp.float32)),
            "num_steps": jnp.asarray(num_steps, jnp.int32),
        }
        return init_state(x, key, extra)

    def step(self, denoise, process, state: SolverState, t, t_next) -> SolverState:
        x = state.x
        s, c = coefficients(process, promote_time(t, x)), coefficients(process, promote_time(t_next, x))
        h = step_size(s, c)
        x0 = call(denoise, x, s.t)
        ex = state.extra
        order_now = _multistep_order(self.order, self.lower_order_final, state)

        # 1 / r0 = h / h_0 with h_0 = lambda_s - lambda_{-1} (0 if h_0 is infinite).
        use2 = order_now >= 2
        h0 = jnp.where(use2, s.lam - ex["lam"][0], 1.0)
        q0 = jnp.where(use2, h / h0, 0.0)
        d1_0 = q0 * (x0 - ex["x0"][0])  # diffusers' D1 (2M) and D1_0 (3M)

        if self.stochastic:
            decay = jnp.exp(-h)  # e^{-h}, 0 for an infinite step
            gain = -jnp.expm1(-2.0 * h)  # 1 - e^{-2h}
            drift = (c.sigma / s.sigma) * decay * x + c.alpha * gain * (x0 + 0.5 * d1_0)
            state, sub = state.next_key()
            z = jax.random.normal(sub, x.shape, x.dtype)
            out = drift + c.sigma * jnp.sqrt(gain) * self.s_noise * z
        elif self.order == 2:
            out = (c.sigma / s.sigma) * x - c.alpha * zphi(1, -h) * (x0 + 0.5 * d1_0)
        else:
            use3 = order_now >= 3
            h1 = jnp.where(use3, ex["lam"][0] - ex["lam"][1], 1.0)
            q1 = jnp.where(use3, h / h1, 0.0)  # 1 / r1
            d1_1 = q1 * (ex["x0"][0] - ex["x0"][1])
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

        extra = dict(ex, x0=shift_in(ex["x0"], x0), lam=shift_in(ex["lam"], s.lam))
        return state.replace(x=out.astype(x.dtype), nfe=state.nfe + 1, step=state.step + 1, extra=extra)


@struct.dataclass
class DPMSolverPP2M(_DPMSolverPPMultistep):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): multistep, second order, 1 evaluation per step.

    Step for step the "midpoint" 2M of diffusers' ``DPMSolverMultistepScheduler``
    (``algorithm_type="dpmsolver++"``, ``solver_order=2``), including ``lower_order_final``.
    """

    lower_order_final: bool = struct.field(pytree_node=False, default=True)
    order = 2


@struct.dataclass
class DPMSolverPP3M(_DPMSolverPPMultistep):
    """Third-order multistep DPM-Solver++ (warm-up with orders 1, 2); 1 evaluation per step.

    ``variant="third_order"`` integrates the quadratic interpolant of ``x0_hat(lambda)``
    exactly; ``variant="diffusers"`` uses the ``D2`` coefficient of the reference code
    (half of that; see the module docstring).
    """

    lower_order_final: bool = struct.field(pytree_node=False, default=True)
    variant: str = struct.field(pytree_node=False, default="third_order")
    order = 3

    def __post_init__(self):
        if self.variant not in ("third_order", "diffusers"):
            raise ValueError(f"dpmpp_3m: variant must be 'third_order' or 'diffusers'; got {self.variant!r}.")

    def _d2_factor(self):
        return 2.0 if self.variant == "third_order" else 1.0


@struct.dataclass
class DPMSolverPP2MSDE(_DPMSolverPPMultistep):
    """SDE-DPM-Solver++(2M) (diffusers' ``"sde-dpmsolver++"``, midpoint); ``s_noise`` (traced) scales the noise."""

    s_noise: float = 1.0
    lower_order_final: bool = struct.field(pytree_node=False, default=True)
    order = 2
    stochastic = True
