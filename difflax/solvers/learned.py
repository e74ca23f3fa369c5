"""Learned few-step samplers: a few parameters fitted to the exact ODE solutions of the user's own denoiser.

A learned sampler is a :class:`~difflax.solvers.base.Solver` (an immutable pytree) that carries
the time grid it was fitted on in ``times`` and steps on those times whatever grid the loop
hands it (the loop's grid must have as many intervals, ``steps``, as ``times``):

>>> sampler = fit_ld3(denoise, process, process.prior_sample(key, (64, d)), "dpmpp_2m", steps=5)
>>> x0, info = difflax.sample(denoise, process, x_T, solver=sampler, steps=sampler.steps)
>>> np.savez("ld3.npz", **to_arrays(sampler)); sampler = from_arrays(np.load("ld3.npz"))

(:mod:`difflax.solvers.serialize`).

This module holds what the learned samplers share, and LD3 (:func:`fit_ld3`,
:class:`LearnedGrid`); EPD is :mod:`difflax.solvers.epd`.

**Teacher.** The target of a calibration draw ``x_T`` is the exact sample of the probability-flow
ODE, ``Psi*(x_T) = D(x*(t_min), t_min)`` (:func:`difflax.solvers.optimize.ode_endpoint`, a
second-order solve with many substeps).

**Slack surrogate** (LD3, Tong et al., "Learning to discretize denoising diffusion ODEs", ICLR 2025,
its relaxed objective). The parameters ``theta`` minimize

    E_{x_T} min_{||x' - x_T|| <= r} ||Psi_theta(x') - Psi*(x_T)||^2,    r = slack * sqrt(E ||x_T||^2),

so the student need only reach the teacher's sample from *some* start near its own: a draw that
a few steps send into another mode of the data moves its start across the boundary instead of
pulling every parameter towards it. With ``slack = 0`` (the default) it is the plain squared
error: the relaxation lowers the typical error at the expense of those rare draws, which
dominate the RMS error, so it is an option for samples judged by their typical quality. The
perturbations ``x' - x_T`` are optimized jointly with ``theta`` by Adam (Kingma & Ba 2015),
projected back onto their balls after every update; the whole fit is one jitted ``lax.scan``,
so it is deterministic given the draws.

**Held-out guard.** A fraction ``validation`` of the calibration draws (the last ones) is not
used to fit: the fit returns the fitted sampler only if its error there is below that of every
baseline (for LD3 the sampler on every named grid that starts at ``t_max``, for EPD its own
initialization), else the best baseline.

Like :func:`difflax.solvers.optimize_grid`, the fits take the denoiser either as ``denoise(x_t, t)``
or as ``denoise(params, x_t, t)`` with ``params=``; compiled programs are cached by the function.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from difflax import pytree
from difflax.checks import check_positive_int
from difflax.solvers.base import Solver, Step, Wrapper, run
from difflax.solvers.optimize import _LAMBDA_CLIP, denoiser_form, holdout_size, named_grids, ode_endpoint
from difflax.solvers.registry import resolve_solver

__all__ = ["LearnedGrid", "fit_ld3", "learned_step"]


def learned_step(times: jax.Array, step: Step) -> Step:
    """The loop's ``step`` moved onto the learned ``times`` (same grid position; the final denoising step,
    ``step.final``, keeps its zero length)."""
    steps = times.shape[0] - 1
    if isinstance(step.num_steps, int) and step.num_steps != steps:
        raise ValueError(
            f"this learned sampler was fitted for steps={steps}; got a grid of {step.num_steps} intervals. "
            f"Pass steps={steps} (or grid=sampler.times)."
        )
    t = times[step.index]
    return step._replace(t=t, t_next=jnp.where(step.final, t, times[step.index + 1]))


@pytree.dataclass
class LearnedGrid(Wrapper):
    """The solver ``inner`` on the learned grid ``times`` (``steps + 1`` times ending in 0), from :func:`fit_ld3`."""

    inner: Solver
    times: jax.Array

    @property
    def steps(self) -> int:
        return self.times.shape[0] - 1

    def step(self, denoise, process, x, state, step: Step):
        return self.inner.step(denoise, process, x, state, learned_step(self.times, step))


# ----------------------------------------------------------------------------------------------
# Fitting, shared by the learned samplers


def check_calibration(x_cal, validation) -> tuple[jax.Array, int]:
    """``(x_cal, n_val)``: the calibration draws as an array and how many of them are held out."""
    if not hasattr(x_cal, "shape") or not jnp.issubdtype(jnp.asarray(x_cal).dtype, jnp.floating):
        raise TypeError(f"x_cal must be a floating-point array of prior draws; got {type(x_cal).__name__}.")
    x_cal = jnp.asarray(x_cal)
    if x_cal.ndim < 2 or x_cal.shape[0] < 2:
        raise ValueError(f"x_cal must have shape (draws >= 2, *sample_shape); got {x_cal.shape}.")
    if not bool(jnp.all(jnp.isfinite(x_cal))):
        raise ValueError("x_cal must be finite; it holds NaN or inf.")
    return x_cal, holdout_size(validation, x_cal.shape[0])


@functools.partial(jax.jit, static_argnames=("fn", "points", "reference_steps"))
def teacher_samples(fn, params, process, x, points, reference_steps):
    """The exact ODE samples of the draws ``x`` (:func:`~difflax.solvers.optimize.ode_endpoint`), jitted per ``fn``."""
    return ode_endpoint(functools.partial(fn, params), process, x, points, reference_steps)


def _sample(solver, denoise, process, x):
    # Learned samplers are deterministic; a traced hyper-parameter (DDIM's eta) cannot show it, so the
    # loop then gets a key whose noise is scaled by that zero.
    key = jax.random.key(0) if solver.stochastic else None
    return run(solver, denoise, process, x, solver.times, final_zero=True, key=key)[0]


def _sq_errors(x, target):
    return jnp.sum(((x - target) ** 2).reshape(x.shape[0], -1), axis=-1)


@functools.partial(jax.jit, static_argnames=("fn",))
def draw_errors(fn, params, process, sampler, x, target) -> jax.Array:
    """Squared distance to ``target`` of the sample of ``sampler`` from each draw of ``x`` (inf where not finite)."""
    errs = _sq_errors(_sample(sampler, functools.partial(fn, params), process, x), target)
    return jnp.where(jnp.isfinite(errs), errs, jnp.inf)


def best_sampler(fn, params, process, samplers, x, target, rows) -> tuple[int, list[float]]:
    """Index of the sampler with the lowest mean error on the draws ``x[rows]``, and every such error.

    Errors are computed on all of ``x`` (one compiled program per sampler structure and batch) and then
    restricted to ``rows``; the first sampler wins a tie.
    """
    errs = [float(np.mean(np.asarray(draw_errors(fn, params, process, s, x, target))[rows])) for s in samplers]
    return int(np.argmin(errs)), errs


def _adam(loss, p, iterations, learning_rate, project):
    """``iterations`` steps of Adam (Kingma & Ba 2015; optax's defaults) with ``project`` after each update."""
    optimizer = optax.adam(learning_rate)

    def body(carry, _):
        p, opt_state = carry
        value, g = jax.value_and_grad(loss)(p)
        updates, opt_state = optimizer.update(g, opt_state, p)
        return (project(optax.apply_updates(p, updates)), opt_state), value

    (p, _), values = jax.lax.scan(body, (p, optimizer.init(p)), None, length=iterations)
    return p, values


@functools.partial(jax.jit, static_argnames=("fn", "make", "iterations"))
def fit_slack(fn, params, process, make, aux, theta, x, target, slack, learning_rate, iterations):
    """Minimize the slack surrogate (module docstring) over ``theta`` for the sampler ``make(theta, aux)``.

    Returns the fitted ``theta`` and the surrogate's value at every iteration.
    """
    denoise = functools.partial(fn, params)
    radius = slack * jnp.sqrt(jnp.mean(jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=-1)))

    def loss(p):
        theta, delta = p
        return jnp.mean(_sq_errors(_sample(make(theta, aux), denoise, process, x + delta), target))

    def project(p):
        theta, delta = p
        norm = jnp.sqrt(jnp.sum(delta.reshape(delta.shape[0], -1) ** 2, axis=-1))
        scale = jnp.minimum(1.0, radius / jnp.maximum(norm, jnp.finfo(delta.dtype).tiny))
        return theta, delta * scale.reshape((-1,) + (1,) * (delta.ndim - 1))

    (theta, _), values = _adam(loss, (theta, jnp.zeros_like(x)), iterations, learning_rate, project)
    return theta, values


def fit_guarded(fn, params, process, make, aux, theta0, baselines, x_cal, target, n_val, opts) -> Solver:
    """Fit ``make(theta, aux)`` from ``theta0`` on the first draws of ``x_cal`` (teacher samples ``target``);
    return it if it beats every sampler of ``baselines`` (a list) on the ``n_val`` held-out draws, else the
    best of them."""
    n_fit = x_cal.shape[0] - n_val
    theta, _ = fit_slack(
        fn, params, process, make, aux, theta0, x_cal[:n_fit], target[:n_fit],
        opts["slack"], opts["learning_rate"], opts["iterations"],
    )  # fmt: skip
    candidates = [make(theta, aux), *baselines]
    if not n_val:
        return candidates[0]
    return candidates[best_sampler(fn, params, process, candidates, x_cal, target, slice(n_fit, None))[0]]


def fit_options(iterations, learning_rate, slack, teacher_points, reference_steps) -> dict:
    """The shared fitting options, checked."""
    check_positive_int(iterations, "iterations")
    check_positive_int(teacher_points, "teacher_points")
    check_positive_int(reference_steps, "reference_steps")
    for value, name in ((learning_rate, "learning_rate"), (slack, "slack")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not np.isfinite(value):
            raise ValueError(f"{name} must be a finite non-negative number; got {value!r}.")
    if learning_rate == 0:
        raise ValueError("learning_rate must be positive; got 0.")
    return {
        "iterations": int(iterations),
        "learning_rate": float(learning_rate),
        "slack": float(slack),
        "teacher_points": int(teacher_points),
        "reference_steps": int(reference_steps),
    }


# ----------------------------------------------------------------------------------------------
# LD3


def lambda_range(process, dtype) -> jax.Array:
    """``[lambda(t_max), lambda(t_min)]`` (half log-SNR, clipped where infinite)."""
    ends = jnp.asarray([process.t_max, process.t_min], dtype)
    return jnp.clip(0.5 * process.log_snr(ends), -_LAMBDA_CLIP, _LAMBDA_CLIP)


def logits_grid(theta, process, lam) -> jax.Array:
    """The grid of the logits ``theta`` (``steps`` of them): steps in ``lambda`` are the shares ``softmax(theta)``
    of ``lam = [lambda(t_max), lambda(t_min)]``, the last share unused (so the last positive time is free),
    then the final 0."""
    share = jnp.cumsum(jax.nn.softmax(theta))[:-1]
    t = process.t_from_log_snr(2.0 * (lam[0] + (lam[1] - lam[0]) * share))
    t_max = jnp.asarray(process.t_max, t.dtype)
    return jnp.concatenate([t_max[None], t, jnp.zeros((1,), t.dtype)])


def grid_logits(grid, process, lam) -> jax.Array:
    """Logits of :func:`logits_grid` for a grid from ``t_max`` ending in 0 (unused share at least 0.1%)."""
    lam_grid = jnp.clip(0.5 * process.log_snr(grid[1:-1]), -_LAMBDA_CLIP, _LAMBDA_CLIP)
    steps = jnp.diff(jnp.concatenate([lam[:1], lam_grid]))
    rest = jnp.maximum(lam[1] - lam_grid[-1], 1e-3 * (lam[1] - lam[0]))
    return jnp.log(jnp.maximum(jnp.concatenate([steps, rest[None]]), 1e-6 * (lam[1] - lam[0])))


@dataclasses.dataclass(frozen=True)
class _OnGrid:
    """``make(theta, (process, lam))`` of LD3: ``LearnedGrid(inner, logits_grid(theta, ...))`` with the solver
    ``inner`` held as a static value (equal by its structure and hyper-parameters), so that under ``jit`` a
    deterministic solver is seen to be one: it runs without a key, and no noise term of a zero-length final
    step enters the derivatives."""

    treedef: object
    leaves: tuple

    @classmethod
    def of(cls, inner: Solver) -> _OnGrid:
        leaves, treedef = jax.tree.flatten(inner)
        if any(np.ndim(v) for v in leaves):
            raise ValueError(f"solver {type(inner).__name__}: fit_ld3 needs scalar hyper-parameters.")
        return cls(treedef, tuple(np.asarray(v).item() for v in leaves))

    def __call__(self, theta, aux) -> LearnedGrid:
        process, lam = aux
        return LearnedGrid(jax.tree.unflatten(self.treedef, self.leaves), logits_grid(theta, process, lam))


def fit_ld3(
    denoise: Callable,
    process,
    x_cal: jax.Array,
    solver="dpmpp_2m",
    steps: int = 5,
    *,
    params=None,
    iterations: int = 300,
    learning_rate: float = 0.05,
    slack: float = 0.0,
    validation: float = 0.25,
    teacher_points: int = 32,
    reference_steps: int = 8,
    **solver_args,
) -> LearnedGrid:
    """Learned time steps for ``solver`` (LD3, Tong et al. 2025): a :class:`LearnedGrid` of ``steps`` intervals.

    The grid has ``steps - 1`` solver steps from ``t_max`` to a free last positive time and the
    final denoising step; its ``steps - 1`` times are ``softmax`` shares of the log-SNR range,
    initialized from the named grid (:data:`difflax.solvers.GRIDS`, starting at ``t_max``) with the
    lowest error on the fitted draws, and optimized *through the sampler* against the teacher's
    samples with the slack surrogate (module docstring), guarded by the held-out draws.

    Args:
      denoise: ``denoise(x_t, t) -> x0_hat``, or ``denoise(params, x_t, t)`` with ``params``.
      process: its forward process.
      x_cal: calibration draws of the prior, shape ``(draws, *sample_shape)``, e.g.
        ``process.prior_sample(key, (64, d))``; test the sampler on other draws.
      solver: a deterministic solver name or object (its hyper-parameters in ``solver_args``).
      steps: grid intervals, the final denoising step included (as :func:`difflax.sample`'s ``steps``).
      params: the denoiser's parameters when ``denoise`` takes them first.
      iterations, learning_rate: Adam's steps and step size (in logits and in units of ``x``).
      slack: radius of the slack balls relative to the RMS norm of the draws (0: plain squared error;
        LD3 uses a small positive radius).
      validation: fraction of ``x_cal`` held out for the guard (0: no guard).
      teacher_points, reference_steps: accuracy of the teacher (:func:`~difflax.solvers.optimize.ode_endpoint`).
    """
    inner = resolve_solver(solver, solver_args)
    if not isinstance(inner, Solver) or inner.stochastic:
        raise ValueError(f"solver must be a deterministic fixed-step solver; got {type(inner).__name__}.")
    check_positive_int(steps, "steps")
    if steps < 2:
        raise ValueError(f"steps must be at least 2 (one solver step and the final denoising step); got {steps}.")
    opts = fit_options(iterations, learning_rate, slack, teacher_points, reference_steps)
    fn, params = denoiser_form(denoise, params)
    x_cal, n_val = check_calibration(x_cal, validation)
    n_fit = x_cal.shape[0] - n_val
    lam = lambda_range(process, x_cal.dtype)
    named = [
        LearnedGrid(inner, jnp.asarray(g, x_cal.dtype))
        for g in named_grids(process, steps, True, process.t_max).values()
    ]
    target = teacher_samples(fn, params, process, x_cal, opts["teacher_points"], opts["reference_steps"])
    init = named[best_sampler(fn, params, process, named, x_cal, target, slice(0, n_fit))[0]]
    theta0 = grid_logits(init.times, process, lam)
    return fit_guarded(
        fn, params, process, _OnGrid.of(inner), (process, lam), theta0, named, x_cal, target, n_val, opts
    )
