"""Adaptive-step probability-flow ODE solves with diffrax (Tsit5 / Dopri5 + PID control).

The probability-flow ODE (Song et al. 2021, eq. 13) is integrated in the coordinates
of the linear (flow-matching) interpolant,

    ``z = x / (alpha + sigma)``,   ``r = sigma / (alpha + sigma)`` in ``(0, 1]``,

in which ``z = (1 - r) x0 + r eps`` for every process and the ODE reads

    ``dz/dr = (z - D(x, t)) / r = eps_hat - x0_hat``,  ``x = (alpha + sigma) z``,  ``t = t(r)``

(``t(r)`` from ``log_snr = 2 log((1 - r) / r)`` and the process's ``t_from_log_snr``).
Why these coordinates and not the process time ``t`` (score_sde) or EDM's
``(x / alpha, sigma / alpha)``:

* For the exact denoiser the ODE in ``(z, r)`` is the *same* for every process (the
  posterior mean depends on ``(alpha, sigma)`` only through ``r`` after rescaling),
  so a tolerance means the same thing for VP, VE, EDM, discrete tables and flows.
* State and velocity stay bounded: ``|z| <~ max(|x0|, |eps|)`` and
  ``dz/dr = E[eps - x0 | z]``. In ``t`` the VP velocity carries
  ``sigma'(t) ~ t^{-1/2}`` near ``t = 0`` and the VE one grows like ``sigma(t)``;
  EDM's scaled state grows to ``sigma_max / alpha`` (80, or ~150 for VP, and
  infinite for the flow interpolant at ``t = 1`` where ``alpha = 0``, which ``r = 1``
  handles).
* Straight trajectories stay straight: a path linear in EDM's ``sigma / alpha``
  (Karras et al. 2022, sec. 3) is linear in ``r`` too, so nothing is lost against
  EDM's choice while the interval becomes compact.
* Fewer evaluations for the same endpoint error than stepping in ``t``, most of all for
  EDM and for the discrete tables, whose ``alpha(t)`` has kinks at the table's knots.

Evaluation count. Tsit5 and Dopri5 are 7-stage first-same-as-last (FSAL) methods:
every *attempted* step, accepted or rejected, evaluates 6 new stages, and the first
stage ``f(t0, y0)`` is evaluated on every attempt until the first step is accepted
(diffrax caches it only on acceptance). The first step is 1% of the interval
(``dt0``, passed explicitly, so no evaluations go into an initial step-size search;
the PID controller then grows or shrinks it, by at most 10x per step). Hence

    ``nfe = 6 * num_steps + first_attempts``  (+ 1 for the final denoising step),

with ``num_steps`` diffrax's count of attempted steps (``num_accepted_steps +
num_rejected_steps``) and ``first_attempts`` (``1 +`` rejections before the first
acceptance, usually 1) tracked by a thin wrapper around ``diffrax.PIDController``.
The tests check the formula against a host-side counter. Under ``jax.vmap`` each
example's ``nfe`` is what its own solve needs; the batched program runs the maximum.

The whole batch is one ODE, as in score_sde's ``ode_sampler``: step sizes are shared
and the error norm is diffrax's RMS over all entries of the batch. ``vmap`` the call
for per-example step sizes.
"""

from __future__ import annotations

from collections.abc import Callable

import diffrax
import jax
import jax.numpy as jnp

from difflax import pytree
from difflax.checks import check_choice, check_floating, check_positive_int
from difflax.solvers.base import call

__all__ = ["METHODS", "Adaptive", "flow_coordinates", "solve_ode", "time_from_r"]

METHODS = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}
# Stages per attempted step after the first (FSAL): 7 - 1 for both methods.
_NEW_STAGES = {"tsit5": 6, "dopri5": 6}
_FIRST_STEP = 0.01  # first step as a fraction of the interval


def check_method(method: str) -> str:
    return check_choice(method, tuple(METHODS), "method")


def flow_coordinates(process, t):
    """``(r, c)`` at time ``t``: ``r = sigma / (alpha + sigma)`` and the scale ``c = alpha + sigma`` (``z = x / c``)."""
    alpha, sigma = process.alpha_sigma(t)
    c = alpha + sigma
    return sigma / c, c


def time_from_r(process, r):
    """Process time at ``r = sigma / (alpha + sigma)``: ``log_snr = 2 log((1 - r) / r)``."""
    return process.t_from_log_snr(2.0 * (jnp.log1p(-r) - jnp.log(r)))


def flow_velocity(denoise: Callable, process, z, r):
    """``dz/dr = (z - D(c z, t(r))) / r`` of the probability-flow ODE in the flow coordinates."""
    t = time_from_r(process, r)
    _, c = flow_coordinates(process, t)
    return (z - call(denoise, c * z, t)) / r


class _CountingController(diffrax.AbstractAdaptiveStepSizeController):
    """``diffrax.PIDController`` that also counts the attempts up to the first accepted step.

    (diffrax re-evaluates the FSAL first stage on each of them; see the module docstring.)
    """

    inner: diffrax.PIDController

    @property
    def rtol(self):
        return self.inner.rtol

    @property
    def atol(self):
        return self.inner.atol

    @property
    def norm(self):
        return self.inner.norm

    def wrap(self, direction):
        return _CountingController(self.inner.wrap(direction))

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        tnext, state = self.inner.init(terms, t0, t1, y0, dt0, args, func, error_order)
        return tnext, (state, jnp.array(False), jnp.array(0, jnp.int32))

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state):
        inner_state, accepted, first_attempts = controller_state
        keep, t0n, t1n, jump, inner_state, result = self.inner.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, inner_state
        )
        first_attempts = first_attempts + jnp.where(accepted, 0, 1).astype(jnp.int32)
        accepted = accepted | keep
        return keep, t0n, t1n, jump, (inner_state, accepted, first_attempts), result


def solve_ode(
    vector_field: Callable,
    y0,
    s0,
    s1,
    *,
    rtol,
    atol,
    method: str = "tsit5",
    max_steps: int = 4096,
    throw: bool = True,
):
    """Integrate ``dy/ds = vector_field(s, y)`` from ``s0`` to ``s1`` (either direction) with diffrax.

    Returns ``(y1, info)`` with ``info`` holding ``nfe`` (vector-field evaluations, see the
    module docstring), ``steps`` (accepted), ``rejected_steps`` and ``success``.
    """
    check_method(method)
    controller = _CountingController(diffrax.PIDController(rtol=rtol, atol=atol))
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda s, y, args: vector_field(s, y)),
        METHODS[method](),
        t0=s0,
        t1=s1,
        dt0=_FIRST_STEP * (s1 - s0),
        y0=y0,
        stepsize_controller=controller,
        saveat=diffrax.SaveAt(t1=True, controller_state=True),
        max_steps=max_steps,
        throw=throw,
    )
    y1 = jax.tree_util.tree_map(lambda a: a[-1], sol.ys)
    first_attempts = sol.controller_state[2]
    num_steps = jnp.asarray(sol.stats["num_steps"], jnp.int32)
    nfe = _NEW_STAGES[method] * num_steps + first_attempts
    info = {
        "nfe": nfe,
        "steps": jnp.asarray(sol.stats["num_accepted_steps"], jnp.int32),
        "rejected_steps": jnp.asarray(sol.stats["num_rejected_steps"], jnp.int32),
        "success": sol.result == diffrax.RESULTS.successful,
    }
    return y1, info


def pf_ode(denoise, process, x, t0, t1, *, rtol, atol, method="tsit5", max_steps=4096, throw=True):
    """Move ``x`` at time ``t0`` to time ``t1`` along the probability-flow ODE (either direction)."""
    dtype = x.dtype
    r0, c0 = flow_coordinates(process, jnp.asarray(t0, dtype))
    r1, c1 = flow_coordinates(process, jnp.asarray(t1, dtype))
    z1, info = solve_ode(
        lambda r, z: flow_velocity(denoise, process, z, r),
        x / c0,
        r0,
        r1,
        rtol=rtol,
        atol=atol,
        method=method,
        max_steps=max_steps,
        throw=throw,
    )
    return (c1 * z1).astype(dtype), info


@pytree.dataclass
class Adaptive:
    """Adaptive probability-flow ODE sampler (diffrax), the analogue of score_sde's ``ode_sampler``.

    Integrates from ``ts[0]`` to the last positive time of the grid (only the ends of the
    grid are used), then takes the final denoising step if the grid ends in ``0``. It chooses
    its own steps, so it is not a :class:`~difflax.solvers.base.Solver`: :func:`difflax.sample`
    calls :meth:`solve` and refuses the options it cannot honour (``return_trajectory``).

    Attributes:
      rtol, atol: tolerances of the PID step-size controller (traced; score_sde: 1e-5).
      method: ``"tsit5"`` (default) or ``"dopri5"`` (static).
      max_steps: diffrax's step budget (static).
      throw: raise if the solve fails (e.g. runs out of steps); with ``False`` check
        ``info["success"]`` instead (static).
    """

    rtol: float = 1e-5
    atol: float = 1e-5
    method: str = pytree.field(static=True, default="tsit5")
    max_steps: int = pytree.field(static=True, default=4096)
    throw: bool = pytree.field(static=True, default=True)
    stochastic = False
    default_grid = "uniform"  # only the ends are used

    def __post_init__(self):
        check_method(self.method)
        check_positive_int(self.max_steps, "max_steps")

    def solve(self, denoise, process, x_T, ts, final_zero, key=None):
        """``(x, info)``: ``info`` has ``nfe``, ``steps`` (accepted), ``rejected_steps``, ``success``, ``ts``."""
        check_floating(x_T, "x_T")
        t_end = ts[-2] if final_zero else ts[-1]
        x, info = pf_ode(
            denoise,
            process,
            x_T,
            ts[0],
            t_end,
            rtol=self.rtol,
            atol=self.atol,
            method=self.method,
            max_steps=self.max_steps,
            throw=self.throw,
        )
        if final_zero:
            x = call(denoise, x, t_end.astype(x.dtype))
            info["nfe"] = info["nfe"] + 1
        info["ts"] = ts
        return x, info
