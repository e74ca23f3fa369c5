"""Optimized time grids: Optimal Stepsize Distillation by dynamic programming.

:func:`optimize_grid` picks, for one solver and a fixed number of steps, the time grid
whose sampler trajectory stays closest to the exact probability-flow ODE solution on a
few calibration draws ``x_T``. It follows "Optimal Stepsize for Diffusion Sampling"
(Pei et al. 2025, OSS):

1. **Candidates and reference.** ``M`` candidate times ``c_0 = t_max > ... > c_{M-1} =
   t_min`` (default: uniform in log-SNR) and a reference trajectory ``x*_i`` at every
   candidate, from a high-accuracy solve of the probability-flow ODE started at the
   calibration draws (:func:`reference_trajectory`: ``reference_steps`` second-order
   exponential-integrator substeps, DPM-Solver-2 / DPM-Solver++(2S) with the midpoint
   in log-SNR, between consecutive candidates).
2. **Dynamic programming over (steps taken ``k``, candidate ``i``).** Stage 0 holds the
   solver's initial state at ``c_0``. At stage ``k`` every candidate ``i`` is reached
   from every earlier candidate ``j < i`` held at stage ``k - 1``, by one step of the
   *student* solver from the student's own stored sample and solver state (so multistep
   history such as DPM-Solver++(2M)'s previous prediction is carried along); the cost is
   ``dp[k][i] = min_j E ||step(state[k-1][j], c_j -> c_i) - x*_i||^2`` over the
   calibration batch, and the state reached through the minimizing ``j`` is stored at
   ``(k, i)`` with a back-pointer. The inner minimum over ``j`` is one ``vmap``; the
   loop over ``i`` is a ``lax.map`` and the loop over ``k`` a ``lax.scan`` (with the
   step count traced, so one compiled program serves every step count of a denoiser
   and solver kind).
3. **Backtracking** from ``(K, M - 1)`` gives the path of exactly ``K`` student steps
   from ``t_max`` to ``t_min``; with ``final_zero`` the grid then gets the final
   denoising step (an exact ``0``), so ``K = steps - 1``.

Options beyond the paper's algorithm: ``free_end`` lets the last positive time be any
candidate, chosen by the error of the final denoising step against the reference
endpoint (with few steps the last step to ``t_min`` is otherwise nearly wasted: it
re-noises the prediction of the step before); ``max_step_ratio`` bounds the growth of
consecutive steps in log-SNR (multistep solvers); ``refine`` polishes the path by a local
search on the final-sample error of the calibration draws. The local costs of the dynamic
program do not see rare draws that a long step sends towards another mode of the data
(they look fine until later), so on data with narrow, well separated modes the optimized
grid gives much lower typical (median) errors than the standard grids at the same NFE
but not always a lower RMS error; more calibration draws, ``max_step_ratio`` and
``refine`` help.

**Held-out guard.** The local costs of the dynamic program, and the calibration draws
themselves, can favour a grid that does worse on new draws than a standard one. So by default
(``validation=0.25``) a quarter of the draws is held out of the search: the returned grid is
the one with the lowest final-sample error on those held-out draws among the optimized grid
and every named grid of :data:`difflax.solvers.GRIDS` that starts at ``t_max`` (all measured
against the same reference endpoints). It is therefore never worse than the best of those
named grids on the held-out draws, and it is a named grid when none is beaten.

**Compiled once.** The compiled programs are cached by the denoiser *function*, the shapes,
the solver kind and the step count. Pass the network's parameters separately
(``optimize_grid(apply, process, x_T, params=params)`` with ``apply(params, x_t, t)``) and a
new call with other parameter values, or a re-created closure over the same ones, reuses the
compiled program; a plain denoiser ``denoise(x_t, t)`` is keyed by the object itself.
``return_info=True`` also returns the time the call took and the held-out errors.

The cost is ``O(K M^2)`` solver steps on the calibration batch, the reference
``O(M * reference_steps)`` (for a cheap denoiser mostly compilation). The result is an ordinary array of
``steps + 1`` times: save it with ``np.save`` and pass it back to
:func:`difflax.sample` as ``grid=``.

An alternative is Align Your Steps (Sabour et al. 2024), which instead minimizes an
upper bound on the KL divergence between the discretized and the exact SDE by
iterative refinement of the grid and transfers across solvers; OSS targets one solver
and one step count directly, and handles multistep solvers through the stored states.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from difflax.checks import check_nonnegative_int, check_positive_int
from difflax.solvers.base import Solver, Step, call, run
from difflax.solvers.grids import GRIDS, make_grid
from difflax.solvers.registry import resolve_solver
from difflax.transitions import coefficients, ddim_step, eps_from_x0

__all__ = ["denoiser_form", "ode_endpoint", "optimize_grid", "reference_trajectory"]

# Log-SNR clip used only to place reference substeps (the flow interpolant has infinite
# log-SNR at its ends); the ends of every interval keep their exact times.
_LAMBDA_CLIP = 15.0


def _midpoint_step(denoise, process, x, s_time, t_time):
    """DPM-Solver-2 with the midpoint in log-SNR (second order, 2 evaluations)."""
    s, t = coefficients(process, s_time), coefficients(process, t_time)
    lam_s = jnp.clip(s.lam, -_LAMBDA_CLIP, _LAMBDA_CLIP)
    lam_t = jnp.clip(t.lam, -_LAMBDA_CLIP, _LAMBDA_CLIP)
    m = coefficients(process, process.t_from_log_snr(lam_s + lam_t))  # log-SNR = 2 lambda
    d = call(denoise, x, s_time)
    u = ddim_step(d, eps_from_x0(x, d, s), m)
    d = call(denoise, u, m.t)
    return ddim_step(d, eps_from_x0(x, d, s), t)


def reference_trajectory(denoise: Callable, process, x_T: jax.Array, times, reference_steps: int = 16) -> jax.Array:
    """High-accuracy probability-flow ODE solution at every time of the decreasing array ``times``.

    Between consecutive times it takes ``reference_steps`` substeps, uniform in
    log-SNR, of the second-order DPM-Solver-2 (midpoint in log-SNR, data prediction;
    Lu et al. 2022). Returns an array of shape ``(len(times), *x_T.shape)`` whose first
    entry is ``x_T``. All times must be positive.
    """
    times = jnp.asarray(times, x_T.dtype)
    if times.ndim != 1 or times.shape[0] < 1:
        raise ValueError(f"times must be a 1-D array; got shape {times.shape}.")
    check_positive_int(reference_steps, "reference_steps")
    frac = jnp.linspace(0.0, 1.0, reference_steps + 1, dtype=x_T.dtype)

    def interval(x, pair):
        s, t = pair
        lam = jnp.clip(0.5 * process.log_snr(jnp.stack([s, t])), -_LAMBDA_CLIP, _LAMBDA_CLIP)
        sub = process.t_from_log_snr(2.0 * (lam[0] + frac * (lam[1] - lam[0])))
        sub = sub.at[0].set(s).at[-1].set(t)

        def substep(x, st):
            return _midpoint_step(denoise, process, x, st[0], st[1]), None

        x, _ = jax.lax.scan(substep, x, (sub[:-1], sub[1:]))
        return x, x

    _, traj = jax.lax.scan(interval, x_T, (times[:-1], times[1:]))
    return jnp.concatenate([x_T[None], traj])


@dataclasses.dataclass(frozen=True)
class _Closed:
    """``denoise(x_t, t)`` as ``fn(params, x_t, t)`` (no parameters); equal to another by its denoiser."""

    denoise: Callable

    def __call__(self, params, x, t):
        return self.denoise(x, t)


def denoiser_form(denoise: Callable, params=None) -> tuple[Callable, object]:
    """``(fn, params)`` with ``fn(params, x_t, t) -> x0_hat``: the static function and the traced parameters.

    With ``params`` given, ``denoise`` already has that form (e.g. ``lambda p, x, t: model.apply(p, x, t)``
    defined once); otherwise ``denoise(x_t, t)`` is wrapped. Compiled programs are cached by ``fn``, so a
    denoiser given with its parameters compiles once for every parameter value of the same shapes.
    """
    if not callable(denoise):
        raise TypeError(f"denoise must be callable; got {type(denoise).__name__}.")
    return (_Closed(denoise), None) if params is None else (denoise, params)


def ode_endpoint(denoise: Callable, process, x_T: jax.Array, points: int = 32, reference_steps: int = 8) -> jax.Array:
    """The exact sample of the probability-flow ODE from ``x_T`` at ``t_max``: ``D(x*(t_min), t_min)``.

    ``x*(t_min)`` is :func:`reference_trajectory` on ``points`` intervals uniform in log-SNR with
    ``reference_steps`` substeps each; the final denoising step is the one every sampler ends with.
    """
    times = make_grid("logsnr", process, points, final_zero=False).astype(x_T.dtype)
    return call(denoise, reference_trajectory(denoise, process, x_T, times, reference_steps)[-1], times[-1])


def _candidate_times(candidates, process, dtype):
    if isinstance(candidates, (int, np.integer)) and not isinstance(candidates, bool):
        if candidates < 2:
            raise ValueError(f"candidates must be at least 2; got {candidates}.")
        return make_grid("logsnr", process, int(candidates) - 1, final_zero=False).astype(dtype)
    cand = np.asarray(candidates, dtype=np.float64)
    if cand.ndim != 1 or cand.size < 2:
        raise ValueError(f"candidates must be an int or a 1-D array of at least 2 times; got shape {cand.shape}.")
    if not np.all(np.diff(cand) < 0) or cand[-1] <= 0:
        raise ValueError("candidate times must be positive and strictly decreasing (from noise towards data).")
    return jnp.asarray(cand, dtype)


def holdout_size(validation, batch: int) -> int:
    """Draws held out of a batch of ``batch`` calibration draws for the fraction ``validation`` in ``[0, 1)``."""
    if isinstance(validation, bool) or not isinstance(validation, (int, float)) or not 0 <= validation < 1:
        raise ValueError(f"validation must be a fraction in [0, 1); got {validation!r}.")
    n_val = round(validation * batch)
    if validation and not 1 <= n_val < batch:
        raise ValueError(
            f"validation={validation} of {batch} calibration draws leaves {n_val} held out and {batch - n_val} "
            "to fit: pass more draws (at least 2) or validation=0."
        )
    return n_val


def named_grids(process, steps: int, final_zero: bool, start) -> dict[str, np.ndarray]:
    """Every named grid of ``steps`` intervals that starts at the time ``start`` (as float64 arrays)."""
    out = {}
    for name in GRIDS:
        if name == "trailing" and not final_zero:
            continue
        g = np.asarray(make_grid(name, process, steps, final_zero=final_zero), np.float64)
        if abs(g[0] - float(start)) <= 1e-6 * abs(float(start)):
            out[name] = g
    return out


def optimize_grid(
    denoise: Callable,
    process,
    x_T: jax.Array,
    solver="dpmpp_2m",
    steps: int = 10,
    *,
    params=None,
    candidates=64,
    reference_steps: int = 16,
    final_zero: bool = True,
    free_end: bool = False,
    refine: int = 0,
    max_step_ratio: float | None = None,
    validation: float = 0.25,
    return_info: bool = False,
    **solver_args,
):
    """The time grid that makes ``solver`` track the exact ODE best on the draws ``x_T`` (OSS).

    See the module docstring for the algorithm (Pei et al. 2025) and the held-out guard.

    Args:
      denoise: the denoiser ``denoise(x_t, t) -> x0_hat``, or with ``params`` a function
        ``denoise(params, x_t, t)`` (then the compiled programs serve every parameter value).
      process: its forward process.
      x_T: calibration draws of the prior, e.g. ``process.prior_sample(key, (64, d))``.
      solver: a deterministic solver name from :data:`difflax.solvers.SOLVERS` or solver object.
      steps: number of grid intervals, as for :func:`difflax.sample` (with ``final_zero``
        the last one is the final denoising step).
      params: the denoiser's parameters (a pytree), passed as its first argument.
      candidates: number ``M`` of candidate times, uniform in log-SNR from ``t_max`` to
        ``t_min``, or a strictly decreasing array of positive candidate times (the grid
        then starts at its first and ends at its last entry).
      reference_steps: second-order substeps between consecutive candidates for the
        reference trajectory.
      final_zero: finish the grid with an exact ``0`` (the final denoising step).
      free_end: with ``final_zero``, let the last positive time be any candidate (chosen
        by the error of the final denoising step ``D(x, c_i)`` against the reference
        endpoint ``D(x*(t_min), t_min)``) instead of ``t_min``.
      refine: at most this many sweeps of a local search after the dynamic program: each
        sweep tries every move of one grid time to another candidate between its
        neighbours and keeps the move that lowers the error of the final sample on the
        calibration draws most (0: plain OSS).
      max_step_ratio: if given, no step may be longer in log-SNR than this many times the
        step before it. Multistep solvers extrapolate from earlier steps; after a run of
        short steps a long one amplifies differences of earlier predictions, which the
        calibration draws may not reveal (a few draws near a mode boundary go astray), so a
        bound such as 3 makes their grids more robust.
      validation: the fraction of ``x_T`` (its last draws) held out of the search to choose
        between the optimized grid and the named grids (0: return the optimized grid).
      return_info: also return a dict with ``seconds`` (wall time of the call, compilation
        included), ``chosen`` (``"optimized"`` or the named grid returned), ``validation_errors``
        (mean squared error of each grid on the held-out draws) and the draw counts.
      **solver_args: hyper-parameters of the solver.

    Returns:
      A strictly decreasing array of ``steps + 1`` times from the first candidate (``t_max``)
      down, followed by ``0`` when ``final_zero``, to be passed as ``grid=``; with
      ``return_info``, ``(grid, info)``.
    """
    start = time.perf_counter()
    solver = resolve_solver(solver, solver_args)
    name = type(solver).__name__
    if not isinstance(solver, Solver):
        raise ValueError(f"solver {name} chooses its own steps; optimize_grid needs a fixed-step solver.")
    if solver.stochastic:
        raise ValueError(f"solver {name} is stochastic with these settings; optimize_grid needs a deterministic one.")
    check_positive_int(steps, "steps")
    check_nonnegative_int(refine, "refine")
    fn, params = denoiser_form(denoise, params)
    x_T = jnp.asarray(x_T)
    if x_T.ndim < 1 or not jnp.issubdtype(x_T.dtype, jnp.floating):
        raise ValueError(f"x_T must be a float array with a leading batch axis; got {x_T.dtype} {x_T.shape}.")
    n_val = holdout_size(validation, x_T.shape[0])
    n_fit = x_T.shape[0] - n_val
    cand = _candidate_times(candidates, process, x_T.dtype)
    m = cand.shape[0]
    k_steps = steps - 1 if final_zero else steps  # student steps between positive times
    if k_steps > m - 1:
        raise ValueError(f"{m} candidates allow at most {m - 1} steps between them; got {k_steps}.")
    tail = [0.0] if final_zero else []
    info = {"calibration_draws": n_fit, "validation_draws": n_val, "chosen": "optimized", "validation_errors": {}}
    if k_steps == 0:
        grid = jnp.asarray(np.array([float(cand[0]), *tail]), x_T.dtype)
        return (grid, {**info, "seconds": time.perf_counter() - start}) if return_info else grid

    max_ratio = jnp.inf if max_step_ratio is None else float(max_step_ratio)
    # One reference for the fitted and the held-out draws, shared by every solver and step count.
    ref, denoised_end = _reference(fn, params, process, x_T, cand, reference_steps)
    target = denoised_end if final_zero else ref[-1]
    pointers, end_cost = _dynamic_program(solver, fn, params, process, ref[:, :n_fit], cand, steps, k_steps, max_ratio)
    pointers = np.asarray(pointers)
    path = [int(np.argmin(np.asarray(end_cost))) if (final_zero and free_end) else m - 1]
    for k in range(k_steps - 1, -1, -1):
        path.append(int(pointers[k, path[-1]]))
    path = np.array(path[::-1])
    if path[0] != 0 or not np.all(np.diff(path) > 0):  # only with non-finite costs everywhere
        raise FloatingPointError(
            f"the grid search found no finite path (path {path}): check the denoiser for NaNs, or raise max_step_ratio."
        )
    if refine:
        lam = np.asarray(0.5 * process.log_snr(cand), np.float64).clip(-_LAMBDA_CLIP, _LAMBDA_CLIP)
        fit = (x_T[:n_fit], target[:n_fit])
        path = _refine(
            solver, fn, params, process, cand, path, fit, final_zero, free_end, refine, lam, float(max_ratio)
        )
    grids = {"optimized": np.concatenate([np.asarray(cand, np.float64)[path], tail])}
    if n_val:
        grids.update(named_grids(process, steps, final_zero, cand[0]))
        stack = jnp.asarray(np.stack(list(grids.values())), x_T.dtype)
        errs = _grid_errors(solver, fn, params, process, x_T[n_fit:], stack, target[n_fit:], final_zero=final_zero)
        info["validation_errors"] = dict(zip(grids, map(float, np.asarray(errs)), strict=True))
        info["chosen"] = list(grids)[int(np.argmin(np.asarray(errs)))]  # the optimized grid on a tie
    grid = jnp.asarray(grids[info["chosen"]], x_T.dtype)
    return (grid, {**info, "seconds": time.perf_counter() - start}) if return_info else grid


def _sq_error(x, target):
    diff = (x - target).reshape(x.shape[0], -1)
    return jnp.mean(jnp.sum(diff**2, axis=-1))


@functools.partial(jax.jit, static_argnames=("fn", "reference_steps"))
def _reference(fn, params, process, x_T, cand, reference_steps):
    """:func:`reference_trajectory` at the candidates and its denoised endpoint ``D(x*(c_{M-1}), c_{M-1})``."""
    denoise = functools.partial(fn, params)
    ref = reference_trajectory(denoise, process, x_T, cand, reference_steps)
    return ref, call(denoise, ref[-1], cand[-1])


@functools.partial(jax.jit, static_argnames=("fn",))
def _dynamic_program(solver, fn, params, process, ref, cand, steps, k_steps, max_ratio):
    """The dynamic program on the reference trajectory ``ref`` at the candidates ``cand``.

    Returns back-pointers ``(M - 1, M)`` (row ``k - 1``, ``k <= k_steps``, holds the best predecessor of
    each ``(k, i)``) and the terminal costs of ending at each candidate after ``k_steps`` steps (the
    error of the final denoising step there against ``D(x*(t_min), t_min)``).

    ``steps`` and ``k_steps`` are traced (stages beyond ``k_steps`` are skipped by a
    ``lax.cond``), so one compiled program serves every step count of a denoiser, solver
    kind and candidate count; the solver's hyper-parameters, the process and the candidate
    times are arguments too. A step ``c_j -> c_i`` is allowed only if its log-SNR length is at
    most ``max_ratio`` times that of the step that reached ``(k - 1, j)``.
    """
    denoise = functools.partial(fn, params)
    m = cand.shape[0]
    idx = jnp.arange(m)
    x_T = ref[0]
    lam = jnp.clip(0.5 * process.log_snr(cand), -_LAMBDA_CLIP, _LAMBDA_CLIP)
    state0 = (x_T, solver.init(process, x_T))
    states = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (m, *jnp.shape(a))), state0)
    valid = idx == 0
    h_prev = jnp.full((m,), jnp.inf, lam.dtype)  # log-SNR length of the step into each node

    def stage(carry, k):
        states, valid, h_prev = carry

        def target(i):
            def from_j(state, j):
                x, solver_state = state
                return solver.step(denoise, process, x, solver_state, Step(cand[j], cand[i], k - 1, steps, None))

            new = jax.vmap(from_j)(states, idx)
            err = jax.vmap(_sq_error, (0, None))(new[0], ref[i])
            h = lam[i] - lam
            ok = valid & (idx < i) & jnp.isfinite(err) & (h <= max_ratio * h_prev)
            err = jnp.where(ok, err, jnp.inf)
            j = jnp.argmin(err)
            return jax.tree_util.tree_map(lambda a: a[j], new), err[j], j, h[j]

        def active(carry):
            new_states, cost, ptr, h_new = jax.lax.map(target, idx)
            # (k, i) is useful only if M - 1 is still reachable in the remaining steps.
            reachable = (idx >= k) & (idx <= m - 1 - (k_steps - k))
            return (new_states, jnp.isfinite(cost) & reachable, h_new), ptr.astype(jnp.int32)

        def skip(carry):
            return carry, jnp.zeros((m,), jnp.int32)

        return jax.lax.cond(k <= k_steps, active, skip, carry)

    (states, valid, _), pointers = jax.lax.scan(stage, (states, valid, h_prev), jnp.arange(1, m))
    # Terminal cost of ending at candidate i with the final denoising step D(x, c_i).
    endpoint = call(denoise, ref[-1], cand[-1])
    out = jax.vmap(lambda x, t: call(denoise, x, t))(states[0], cand)
    end_cost = jax.vmap(_sq_error, (0, None))(out, endpoint)
    return pointers, jnp.where(valid & jnp.isfinite(end_cost), end_cost, jnp.inf)


@functools.partial(jax.jit, static_argnames=("fn", "final_zero"))
def _grid_errors(solver, fn, params, process, x_T, grids, target, *, final_zero):
    """Mean squared final-sample error against ``target`` of the sampler from ``x_T`` on each row of ``grids``."""
    denoise = functools.partial(fn, params)

    def one(ts):
        # optimize_grid checked that the solver is deterministic; traced here, a hyper-parameter such
        # as DDIM's eta cannot show it, so the loop gets a key whose noise is scaled by that zero.
        x, _ = run(solver, denoise, process, x_T, ts, final_zero=final_zero, key=jax.random.key(0))
        err = _sq_error(x, target)
        return jnp.where(jnp.isfinite(err), err, jnp.inf)

    return jax.vmap(one)(grids)


def _refine(solver, fn, params, process, cand, path, draws, final_zero, free_end, sweeps, lam, max_ratio):
    """Greedy local search on the final-sample error over the calibration ``draws = (x_T, target)`` (``refine``)."""
    x_T, target = draws
    m = cand.shape[0]
    tail = jnp.zeros((1,), cand.dtype) if final_zero else jnp.zeros((0,), cand.dtype)

    def allowed(q):
        h = np.diff(lam[q])
        return bool(np.all(h[1:] <= max_ratio * h[:-1]))

    best = None
    movable = range(1, len(path) if (final_zero and free_end) else len(path) - 1)
    for _ in range(sweeps):
        proposals = [path]  # first: the current path, so one compiled shape serves every sweep
        for p in movable:
            hi = path[p + 1] if p + 1 < len(path) else m
            for c in range(path[p - 1] + 1, hi):
                if c != path[p]:
                    q = path.copy()
                    q[p] = c
                    if allowed(q):
                        proposals.append(q)
        if len(proposals) == 1:
            break
        proposals += [path] * (-len(proposals) % m)  # pad to a multiple of M: few compiled shapes
        paths = jnp.asarray(np.stack(proposals))
        grids = jnp.concatenate([cand[paths], jnp.broadcast_to(tail, (paths.shape[0], tail.shape[0]))], axis=1)
        errs = np.asarray(_grid_errors(solver, fn, params, process, x_T, grids, target, final_zero=final_zero))
        best = errs[0] if best is None else best
        i = int(np.argmin(errs))
        if not errs[i] < best * (1.0 - 1e-6):
            break
        best, path = float(errs[i]), proposals[i]
    return path
