"""EPD: the ensemble parallel direction solver, its few parameters fitted to the exact ODE solution.

Zhu et al. 2025 ("Distilling parallel gradients for fast ODE solvers of diffusion models",
ICCV; EPD-Solver) integrate the probability-flow ODE in the scaled coordinates
``y = x / alpha``, ``rho = sigma / alpha``, where it reads ``dy/drho = eps_hat(x, t)``
(Karras et al. 2022), by a mean-value rule with ``K`` learned directions per step. From
``rho_n`` to ``rho_{n+1}``, with ``eps_n = eps_hat(x_n, t_n)``:

    tau_k = rho_{n+1}^{r_k} rho_n^{1 - r_k}                  (intermediate levels, r_k in (0, 1))
    y_k   = y_n + (tau_k - rho_n) eps_n                      (Euler to each of them)
    y_{n+1} = y_n + (rho_{n+1} - rho_n) sum_k w_k eps_hat(alpha(tau_k) y_k, t(tau_k)),
                                                             (w on the simplex)

so a step costs ``1 + K`` denoiser evaluations, the ``K`` of them independent (one batched call,
parallel on an accelerator). ``K = 1`` is the two-evaluation step of AMED-Solver (Zhou et al.
2024, "Fast ODE-based sampling for diffusion models in around 5 steps") without its scaling
factor. The ``r`` and ``w`` of every step (no network) are fitted by :func:`fit_epd` to the exact
ODE samples of calibration draws through the whole sampler, with the slack surrogate and the
held-out guard of :mod:`difflax.solvers.learned`, together with the grid's times (LD3's
parametrization; the paper keeps a fixed grid, ``learn_times=False``). The sampler ends with the
final denoising step, so ``NFE = (1 + K)(steps - 1) + 1``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from difflax import pytree
from difflax.checks import check_positive_int
from difflax.solvers.base import Solver, Step, call
from difflax.solvers.learned import (
    best_sampler,
    check_calibration,
    fit_guarded,
    fit_options,
    grid_logits,
    lambda_range,
    learned_step,
    logits_grid,
    teacher_samples,
)
from difflax.solvers.optimize import denoiser_form, named_grids
from difflax.transitions import coefficients, eps_from_x0

__all__ = ["EPD", "fit_epd"]


@pytree.dataclass
class EPD(Solver):
    """The EPD step (module docstring) on ``times`` (``steps + 1``, ending in 0) with per-step
    intermediate positions ``r`` and simplex weights ``weights``, both ``(steps - 1, K)``."""

    times: jax.Array
    r: jax.Array
    weights: jax.Array

    def __post_init__(self):
        shape = jnp.shape(self.times)
        if jnp.ndim(self.times) != 1 or jnp.shape(self.r) != jnp.shape(self.weights) or jnp.ndim(self.r) != 2:
            raise ValueError(
                f"EPD: times must be 1-D and r, weights (steps - 1, K); got {shape}, "
                f"{jnp.shape(self.r)}, {jnp.shape(self.weights)}."
            )
        if jnp.shape(self.r)[0] != shape[0] - 2:
            raise ValueError(
                f"EPD: r and weights need one row per solver step ({shape[0] - 2}); got {jnp.shape(self.r)}."
            )

    @property
    def steps(self) -> int:
        return self.times.shape[0] - 1

    @property
    def evals_per_step(self) -> int:
        return 1 + self.r.shape[-1]

    def step(self, denoise, process, x, state, step: Step):
        step = learned_step(self.times, step)
        s, c = coefficients(process, step.t), coefficients(process, step.t_next)
        rho_s, rho_c = s.sigma / s.alpha, c.sigma / c.alpha
        eps = eps_from_x0(x, call(denoise, x, step.t), s)
        r, w = self.r[step.index], self.weights[step.index]
        tau = rho_c**r * rho_s ** (1.0 - r)
        t_k = process.t_from_log_snr(-2.0 * jnp.log(tau))
        expand = (-1,) + (1,) * x.ndim
        y_k = x / s.alpha + (tau - rho_s).reshape(expand) * eps
        x_k = process.alpha(t_k).reshape(expand) * y_k
        eps_k = jax.vmap(lambda xk, tk: eps_from_x0(xk, call(denoise, xk, tk), coefficients(process, tk)))(x_k, t_k)
        y = x / s.alpha + (rho_c - rho_s) * jnp.tensordot(w, eps_k, axes=1)
        return c.alpha * y, state


def _epd(theta, aux) -> EPD:
    time_logits, r_logits, w_logits = theta
    process, lam, times = aux
    times = times if time_logits is None else logits_grid(time_logits, process, lam)
    return EPD(times, jax.nn.sigmoid(r_logits), jax.nn.softmax(w_logits, axis=-1))


def fit_epd(
    denoise: Callable,
    process,
    x_cal: jax.Array,
    steps: int = 3,
    *,
    points: int = 1,
    grid="best",
    learn_times: bool = True,
    params=None,
    iterations: int = 300,
    learning_rate: float = 0.05,
    slack: float = 0.0,
    validation: float = 0.25,
    teacher_points: int = 32,
    reference_steps: int = 8,
) -> EPD:
    """Fit an :class:`EPD` sampler of ``steps`` grid intervals with ``points`` (``K``) directions per step.

    Starts from ``r_k = k / (K + 1)`` and equal weights (the geometric midpoint for ``K = 1``) on
    ``grid``: a name from :data:`difflax.solvers.GRIDS`, an array of ``steps + 1`` times ending in 0,
    or ``"best"``, the named grid (starting at ``t_max``) on which this start has the lowest error on the
    fitted draws. With ``learn_times`` the grid's times are fitted too, as in :func:`~difflax.solvers.learned.fit_ld3`
    (an extension: EPD keeps a fixed grid). Returns the fitted sampler if it beats its start on the held-out
    draws, else the start.
    The other arguments are those of :func:`difflax.solvers.learned.fit_ld3`.
    """
    check_positive_int(steps, "steps")
    check_positive_int(points, "points")
    if steps < 2:
        raise ValueError(f"steps must be at least 2 (one EPD step and the final denoising step); got {steps}.")
    opts = fit_options(iterations, learning_rate, slack, teacher_points, reference_steps)
    fn, params = denoiser_form(denoise, params)
    x_cal, n_val = check_calibration(x_cal, validation)
    n_fit = x_cal.shape[0] - n_val
    r0 = jnp.broadcast_to(jnp.arange(1, points + 1) / (points + 1), (steps - 1, points)).astype(x_cal.dtype)
    lam = lambda_range(process, x_cal.dtype)
    named = named_grids(process, steps, True, process.t_max)
    if isinstance(grid, str) and grid != "best":
        if grid not in named:
            raise ValueError(f"grid must be 'best', an array or one of {', '.join(map(repr, named))}; got {grid!r}.")
        grids = [named[grid]]
    elif isinstance(grid, str):
        grids = list(named.values())
    else:
        grids = [np.asarray(grid, np.float64)]
        if grids[0].shape != (steps + 1,) or grids[0][-1] != 0 or not np.all(np.diff(grids[0]) < 0):
            raise ValueError(f"grid must be a decreasing array of steps + 1 = {steps + 1} times ending in 0.")
    r_logits = jnp.log(r0 / (1 - r0))
    starts = [EPD(jnp.asarray(g, x_cal.dtype), r0, jax.nn.softmax(jnp.zeros_like(r0), axis=-1)) for g in grids]
    target = teacher_samples(fn, params, process, x_cal, opts["teacher_points"], opts["reference_steps"])
    start = starts[best_sampler(fn, params, process, starts, x_cal, target, slice(0, n_fit))[0]]
    theta0 = (grid_logits(start.times, process, lam) if learn_times else None, r_logits, jnp.zeros_like(r0))
    aux = (process, lam, start.times)
    return fit_guarded(fn, params, process, _epd, aux, theta0, [start], x_cal, target, n_val, opts)
