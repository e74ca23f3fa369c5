"""Benchmark: difflax's solvers and time grids against diffusers' schedulers.

1. Accuracy. A ``--dim``-dimensional Gaussian mixture with narrow modes (``--components``
   isotropic components of std ``--std``, unequal weights) under DDPM's linear 1000-step
   schedule (``DiscreteVP.linear()``), sampled with its exact denoiser in float64 from the
   same ``--num`` draws ``x_T`` by

   * difflax: every solver with every time grid (uniform, trailing, logsnr, karras, edm)
     and the grid of :func:`difflax.solvers.optimize_grid` (OSS on ``--calibration`` other
     draws with its held-out guard, ``--candidates`` log-SNR candidates, a free last time, and
     for the multistep solvers ``max_step_ratio=3``); Euler and Heun both in process time and in
     the EDM scaling of diffusers' discrete schedulers (``*-edm``, via
     :func:`difflax.solvers.to_edm`, on the same noise levels). One compiled program per
     solver and step count serves every grid (see :func:`_difflax_sampler`; checked against
     :func:`difflax.sample`);
   * difflax's learned samplers, fitted with their defaults on the ``--calibration`` draws
     (never on the test draws): LD3 time steps for DPM-Solver++(2M), iPNDM and UniPC-bh2
     (:func:`difflax.solvers.fit_ld3`) and EPD with ``K = 1, 2`` directions per step
     (:func:`difflax.solvers.fit_epd`), each timed (fitting, compilation included), and each
     also evaluated on a second mixture of the same kind that it was not fitted on;
   * diffusers: DDIM, Euler, Heun, DPM-Solver++ 2M / 3M, UniPC and DEIS with their timestep
     spacings and Karras (and Lu) sigmas, driven by the same model read as an eps
     prediction at timestep ``n`` (difflax time ``(n + 1) / N``); their float32 tables are
     replaced by the float64 ones of ``DiscreteVP`` (as in the conformance tests).

   The error is the RMS over draws of the Euclidean distance to the exact endpoint of the
   probability-flow ODE started at the method's own first time: a high-accuracy solve
   (:func:`difflax.solvers.optimize.reference_trajectory`, checked against a coarser one)
   to ``t_min`` followed by the same final denoising step ``D(x, t_min)`` the methods end
   with (for methods that stop at ``t_min`` without it -- diffusers' DEIS, and UniPC-bh1,
   run with ``final_sigmas_type="sigma_min"`` because its step to 0 returns NaN in
   diffusers 0.42 -- the ODE state at ``t_min``). Step counts are set so that the number
   of denoiser evaluations (NFE) is exactly ``--nfes`` (5, 10, 20); combinations where it cannot
   be matched (e.g. Heun's ``2 steps - 1``) are marked ``n/a`` and listed. With narrow
   modes the RMS is dominated by the few draws that a coarse solver sends into a
   different mode; the median error of the best configurations is printed as well.
2. Overhead. Wall time per sampling step with a trivially cheap denoiser (linear) on a
   small float32 batch (``--overhead-batch``, ``--overhead-steps``): the jitted difflax
   sampler (total / steps) against diffusers' Python loop of ``scheduler.step`` (and
   ``scale_model_input``) per step; interleaved minima.
3. Cost of the jitted loop. For a denoiser as costly as a small network (a jitted MLP,
   widened until a call costs ``--mlp-ms``), the jitted sampler's time against ``NFE``
   back-to-back calls of the denoiser alone: median and interquartile range of the ratio
   over interleaved pairs of runs.

XLA:CPU runs one thread per op unless ``XLA_FLAGS`` is set (reproducible timings on a
shared machine). Prints the tables (RMS and median errors, fitting times) and whether the
targets hold (at NFE 5 and 10 difflax's best method has at most half the RMS error of
diffusers' best configuration;
overhead ratio >= 20x; jitted sampler <= 1.05 x NFE x denoiser time), and writes
``solvers.png`` (error against NFE, best grid per solver) and ``solvers.json`` into
``--out`` (default ``benchmarks/results/``). ``--solvers``, ``--learned`` and
``--accuracy-only`` (no parts 2 and 3) shorten a run.

    python -m benchmarks.solvers [--out DIR] [--num 512] [--dim 16] [--components 8] [--std 0.08]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
import warnings
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One thread per XLA:CPU op: timings on a shared machine are then reproducible (with
# multi-threaded Eigen one delayed thread stalls every op). Set XLA_FLAGS to override.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import difflax  # noqa: E402
from difflax.analytic import GaussianMixture  # noqa: E402
from difflax.solvers import SOLVERS, fit_epd, fit_ld3, get_solver, make_grid, optimize_grid, run, to_edm  # noqa: E402
from difflax.solvers.edm_coordinates import edm_sigma  # noqa: E402
from difflax.solvers.optimize import ode_endpoint, reference_trajectory  # noqa: E402

N_TRAIN = 1000

GRIDS = ("uniform", "trailing", "logsnr", "karras", "edm", "optimized")

# label, registry name, hyper-parameters, evaluations per step, EDM scaling
DIFFLAX = [
    ("ddim", "ddim", {}, 1, False),
    ("euler", "euler", {}, 1, False),
    ("euler-edm", "euler", {}, 1, True),
    ("heun", "heun", {}, 2, False),
    ("heun-edm", "heun", {}, 2, True),
    ("dpm_solver-2", "dpm_solver", {"order": 2}, 2, False),
    ("dpm_solver-3", "dpm_solver", {"order": 3}, 3, False),
    ("dpmpp_2s", "dpmpp_2s", {}, 2, False),
    ("dpmpp_2m", "dpmpp_2m", {}, 1, False),
    ("dpmpp_3m", "dpmpp_3m", {}, 1, False),
    ("unipc-bh1", "unipc", {"variant": "bh1"}, 1, False),
    ("unipc-bh2", "unipc", {"variant": "bh2"}, 1, False),
    ("unipc-bh2-3", "unipc", {"variant": "bh2", "order": 3}, 1, False),
    ("deis", "deis", {}, 1, False),
]


MULTISTEP = ("dpmpp_2m", "dpmpp_3m", "unipc", "deis")


def steps_for(nfe, per_step):
    """Grid intervals giving exactly ``nfe`` evaluations: ``per_step (steps - 1) + 1`` (final step: 1)."""
    steps, rest = divmod(nfe - 1, per_step)
    return steps + 1 if rest == 0 else None


def fmt(v):
    return "n/a" if v is None else ("nan" if not np.isfinite(v) else f"{v:.4f}")


class Problem:
    """The mixture, its exact denoiser and eps model, the draws, and exact ODE endpoints."""

    def __init__(self, args):
        rng = np.random.default_rng(args.seed)
        self.process = difflax.DiscreteVP.linear()
        means = rng.normal(size=(args.components, args.dim))
        weights = rng.uniform(0.5, 1.5, size=args.components)
        self.gm = GaussianMixture.isotropic(means, args.std, weights=weights)
        self.denoise = jax.jit(self.gm.denoiser(self.process))
        self.eps = jax.jit(difflax.denoiser_to(self.denoise, self.process, "eps"))
        self.x_T = jax.random.normal(jax.random.key(args.seed + 1), (args.num, args.dim), jnp.float64)
        self.x_cal = jax.random.normal(jax.random.key(args.seed + 2), (args.calibration, args.dim), jnp.float64)
        self.t_min = float(self.process.t_min)
        self.fine = args.reference_points
        self._ref = jax.jit(
            lambda x, times, sub: reference_trajectory(self.denoise, self.process, x, times, sub)[-1],
            static_argnums=2,
        )
        self._cache = {}
        self.edm = to_edm(self.denoise, self.process)  # one closure: optimize_grid compiles once for it
        # A second mixture of the same kind, for samplers fitted on the first: its denoiser and exact samples.
        rng = np.random.default_rng(args.seed + 100)
        means = rng.normal(size=(args.components, args.dim))
        other = GaussianMixture.isotropic(means, args.std, weights=rng.uniform(0.5, 1.5, size=args.components))
        other = jax.jit(other.denoiser(self.process))
        endpoint = jax.jit(lambda x: ode_endpoint(other, self.process, x, args.reference_points, 8))
        self.other = (other, np.asarray(endpoint(self.x_T)))

    def fine_times(self, t_start, n):
        lam = np.linspace(
            float(self.process.log_snr(t_start)), float(self.process.log_snr(self.t_min)), n, dtype=np.float64
        )
        t = np.array(self.process.t_from_log_snr(jnp.asarray(lam)), np.float64)
        t[0], t[-1] = t_start, self.t_min
        return jnp.asarray(t)

    def exact(self, t_start, denoised=True):
        """Exact endpoint from ``x_T`` at ``t_start``: ``D(x*(t_min), t_min)`` (or ``x*(t_min)``)."""
        key = round(float(t_start), 12)
        if key not in self._cache:
            x_min = self._ref(self.x_T, self.fine_times(key, self.fine), 8)
            t = jnp.full((self.x_T.shape[0],), self.t_min)
            self._cache[key] = (np.asarray(x_min), np.asarray(self.denoise(x_min, t)))
        x_min, end = self._cache[key]
        return end if denoised else x_min

    def reference_check(self):
        """Largest deviation of the reference from one with a quarter of the work (its own error bound)."""
        coarse = self._ref(self.x_T, self.fine_times(1.0, self.fine // 2), 4)
        coarse = self.denoise(coarse, jnp.full((self.x_T.shape[0],), self.t_min))
        return float(np.max(np.abs(np.asarray(coarse) - self.exact(1.0))))

    def errors(self, x, t_start, denoised=True):
        d = np.linalg.norm(np.asarray(x, np.float64) - self.exact(t_start, denoised), axis=-1)
        return float(np.sqrt(np.mean(d**2))), float(np.median(d))


# ----------------------------------------------------------------------------------------------
# 1a. difflax


def _config(label):
    return next(c for c in DIFFLAX if c[0] == label)


@functools.cache
def _difflax_sampler(problem, label, steps):
    """Jitted :func:`difflax.solvers.run` over a stack of grids and starting points (one compile per solver and
    step count): ``(xs, grids) -> (samples, nfe)``. :func:`check_sampler` compares it with :func:`difflax.sample`."""
    _, name, kwargs, _, edm = _config(label)
    solver = get_solver(name, **kwargs)
    denoise, process = problem.edm if edm else (problem.denoise, problem.process)

    def one(x, ts):
        x, info = run(solver, denoise, process, x, ts, final_zero=True)
        return x, info["nfe"]

    return jax.jit(jax.vmap(one))


def check_sampler(problem):
    """Largest difference between the batched benchmark sampler and :func:`difflax.sample`."""
    worst = 0.0
    for label, steps in (("unipc-bh2-3", 7), ("heun-edm", 3)):
        _, name, kwargs, _, edm = _config(label)
        if name not in SOLVERS:
            continue
        grid = np.asarray(make_grid("logsnr", problem.process, steps), np.float64)
        x = problem.x_T[:64]
        denoise, process = problem.edm if edm else (problem.denoise, problem.process)
        if edm:
            x = x / float(problem.process.alpha(grid[0]))
            grid = np.concatenate([np.asarray(edm_sigma(problem.process, jnp.asarray(grid[:-1]))), [0.0]])
        want, info = difflax.sample(denoise, process, x, solver=name, steps=steps, grid=jnp.asarray(grid), **kwargs)
        got, nfe = _difflax_sampler(problem, label, steps)(x[None], jnp.asarray(grid)[None])
        assert int(nfe[0]) == int(info["nfe"]), (label, nfe, info["nfe"])
        worst = max(worst, float(jnp.max(jnp.abs(got[0] - want))))
    return worst


def run_difflax(problem, args, log):
    results, medians, grids_used, skipped, fit_time = {}, {}, {}, [], {}
    process = problem.process
    for label, name, kwargs, per_step, edm in DIFFLAX:
        multistep = name in MULTISTEP
        if name not in SOLVERS or label not in args.solvers:
            skipped.append(f"{label} (not run)")
            continue
        for nfe in args.nfes:
            steps = steps_for(nfe, per_step)
            if steps is None:
                skipped.append(f"{label} at NFE {nfe} (NFE = {per_step} (steps - 1) + 1)")
                continue
            t0 = time.perf_counter()
            grids = {g: np.asarray(make_grid(g, process, steps), np.float64) for g in GRIDS[:-1]}
            # OSS with its defaults (held-out guard), a free last time, multistep solvers with steps <= 3x the last.
            oss = {"candidates": args.candidates, "free_end": True, "max_step_ratio": 3.0 if multistep else None}
            if edm:
                den_e, proc_e = problem.edm
                y_cal = problem.x_cal / float(process.alpha(1.0))
                opt = optimize_grid(den_e, proc_e, y_cal, solver=name, steps=steps, **oss, **kwargs)
                # back to process time for the table (the sampler below maps to noise levels)
                lam = -2.0 * np.log(np.asarray(opt[:-1], np.float64))
                t_opt = np.asarray(process.t_from_log_snr(jnp.asarray(lam)), np.float64)
                grids["optimized"] = np.concatenate([t_opt, [0.0]])
            else:
                opt = optimize_grid(problem.denoise, process, problem.x_cal, solver=name, steps=steps, **oss, **kwargs)
                grids["optimized"] = np.asarray(opt, np.float64)
            fit_time[(label, "optimized", nfe)] = t_opt_s = time.perf_counter() - t0
            names = list(grids)
            stack = np.stack([grids[g] for g in names])
            alphas = np.asarray(process.alpha(jnp.asarray(stack[:, 0])), np.float64)
            if edm:  # noise levels sigma / alpha, and the scaled starting points x / alpha
                sig = np.asarray(edm_sigma(process, jnp.asarray(stack[:, :-1])), np.float64)
                stack = np.concatenate([sig, np.zeros((len(names), 1))], axis=1)
                xs = problem.x_T[None] / alphas[:, None, None]
            else:
                xs = jnp.broadcast_to(problem.x_T, (len(names), *problem.x_T.shape))
            t0 = time.perf_counter()
            out, nfes = _difflax_sampler(problem, label, steps)(jnp.asarray(xs), jnp.asarray(stack))
            assert np.all(np.asarray(nfes) == nfe), (label, nfe, nfes)
            out = np.asarray(out)
            t_run = time.perf_counter() - t0
            for g, x, grid in zip(names, out, grids.values(), strict=True):
                rms, med = problem.errors(x, grid[0])
                results[(label, g, nfe)] = rms
                medians[(label, g, nfe)] = med
            grids_used[(label, nfe)] = grids["optimized"].tolist()
            log(f"  difflax {label:13s} NFE {nfe:2d}: optimize {t_opt_s:5.1f}s, sample {t_run:5.1f}s")
    return results, medians, grids_used, skipped, fit_time


def run_learned(problem, args, log):
    """LD3 time steps (:func:`difflax.solvers.fit_ld3`) and EPD (:func:`difflax.solvers.fit_epd`), fitted on the
    calibration draws with their defaults and evaluated on the test draws; also on a second mixture they were not
    fitted on (its own exact endpoints)."""
    results, medians, skipped, fit_time, transfer = {}, {}, [], {}, {}
    process = problem.process
    methods = [(f"ld3-{s}", "ld3", s, 1) for s in ("dpmpp_2m", "ipndm", "unipc-bh2")]
    methods += [(f"epd-K{k}", "epd", None, k) for k in (1, 2)]
    for label, kind, solver, k in methods:
        if label not in args.learned:
            continue
        for nfe in args.nfes:
            steps = steps_for(nfe, 1 + k if kind == "epd" else 1)
            if steps is None or steps < 2:
                skipped.append(f"{label} at NFE {nfe}")
                continue
            t0 = time.perf_counter()
            if kind == "ld3":
                name, kwargs = ("unipc", {"variant": "bh2"}) if solver == "unipc-bh2" else (solver, {})
                fitted = fit_ld3(problem.denoise, process, problem.x_cal, name, steps, **kwargs)
            else:
                fitted = fit_epd(problem.denoise, process, problem.x_cal, steps, points=k)
            fit_time[(label, "learned", nfe)] = time.perf_counter() - t0
            for which, (denoise, exact) in {"test": (problem.denoise, None), "other": problem.other}.items():
                x, info = _learned_sampler(fitted, process)(denoise, problem.x_T)
                assert int(info) == nfe, (label, nfe, info)
                rms, med = problem.errors(x, process.t_max) if exact is None else _rms_median(x, exact)
                if which == "test":
                    results[(label, "learned", nfe)], medians[(label, "learned", nfe)] = rms, med
                else:
                    transfer[(label, "learned", nfe)] = rms
            log(f"  learned {label:13s} NFE {nfe:2d}: fit {fit_time[(label, 'learned', nfe)]:5.1f}s")
    return results, medians, skipped, fit_time, transfer


def _learned_sampler(sampler, process):
    @functools.partial(jax.jit, static_argnums=0)
    def sample(denoise, x):
        x, info = difflax.sample(denoise, process, x, solver=sampler, steps=sampler.steps)
        return x, info["nfe"]

    return sample


def _rms_median(x, exact):
    d = np.linalg.norm(np.asarray(x, np.float64) - np.asarray(exact, np.float64), axis=-1)
    return float(np.sqrt(np.mean(d**2))), float(np.median(d))


# ----------------------------------------------------------------------------------------------
# 1b. diffusers


def diffusers_configs(diffusers):
    """``(scheduler label, spacing label, factory, evaluations per set_timesteps step)``."""
    base = {"num_train_timesteps": N_TRAIN, "beta_schedule": "linear", "prediction_type": "epsilon"}
    cfgs = []
    spacings = ("leading", "trailing", "linspace")

    def add(label, spacing, cls, per=1, **kw):
        cfgs.append((label, spacing, lambda: cls(**base, **kw), per))

    for sp in spacings:
        add("DDIM", sp, diffusers.DDIMScheduler, set_alpha_to_one=True, clip_sample=False, timestep_spacing=sp)
    for label, cls, per in (
        ("Euler", diffusers.EulerDiscreteScheduler, 1),
        ("Heun", diffusers.HeunDiscreteScheduler, 2),
    ):
        for sp in spacings:
            add(label, sp, cls, per, timestep_spacing=sp)
        add(label, "karras", cls, per, use_karras_sigmas=True)
    dpm = {"algorithm_type": "dpmsolver++", "final_sigmas_type": "zero", "lower_order_final": True}
    for order in (2, 3):
        label = f"DPMSolver++{order}M"
        for sp in spacings:
            add(label, sp, diffusers.DPMSolverMultistepScheduler, solver_order=order, timestep_spacing=sp, **dpm)
        add(label, "karras", diffusers.DPMSolverMultistepScheduler, solver_order=order, use_karras_sigmas=True, **dpm)
        add(label, "lu", diffusers.DPMSolverMultistepScheduler, solver_order=order, use_lu_lambdas=True, **dpm)
    for variant, order, final in (("bh2", 2, "zero"), ("bh2", 3, "zero"), ("bh1", 2, "sigma_min")):
        label = f"UniPC-{variant}-{order}"
        kw = {"solver_type": variant, "solver_order": order, "final_sigmas_type": final}
        for sp in ("linspace", "trailing"):
            add(label, sp, diffusers.UniPCMultistepScheduler, timestep_spacing=sp, **kw)
        add(label, "karras", diffusers.UniPCMultistepScheduler, use_karras_sigmas=True, **kw)
    for order in (2, 3):
        for sp in ("linspace", "trailing"):
            add(f"DEIS-{order}", sp, diffusers.DEISMultistepScheduler, solver_order=order, timestep_spacing=sp)
        add(f"DEIS-{order}", "karras", diffusers.DEISMultistepScheduler, solver_order=order, use_karras_sigmas=True)
    return cfgs


def float64_tables(torch, scheduler, process):
    """The float64 schedule of ``process`` in a diffusers scheduler (before ``set_timesteps``)."""
    abar = torch.from_numpy(np.array(process.alphas_cumprod, np.float64))
    scheduler.alphas_cumprod = abar
    scheduler.alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    scheduler.betas = 1.0 - scheduler.alphas
    if hasattr(scheduler, "alpha_t"):
        scheduler.alpha_t = abar.sqrt()
        scheduler.sigma_t = (1.0 - abar).sqrt()
        scheduler.lambda_t = scheduler.alpha_t.log() - scheduler.sigma_t.log()
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


def run_diffusers_once(torch, problem, scheduler, steps):
    """Sample with a diffusers scheduler; returns ``(x, first time, ends with denoising, NFE)``."""
    float64_tables(torch, scheduler, problem.process)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    t_first = (float(timesteps[0]) + 1.0) / N_TRAIN
    sigmas = getattr(scheduler, "sigmas", None)
    denoised = sigmas is None or float(sigmas[-1]) == 0.0
    x_vp = np.asarray(problem.x_T)
    scaled = float(scheduler.init_noise_sigma) != 1.0  # Euler / Heun work on x / alpha
    alpha0 = float(problem.process.alpha(t_first))
    x = torch.from_numpy(x_vp / alpha0 if scaled else x_vp.copy())
    nfe = 0
    for n in timesteps:
        inp = scheduler.scale_model_input(x, n)
        t = jnp.full((x.shape[0],), (float(n) + 1.0) / N_TRAIN)
        eps = torch.from_numpy(np.array(problem.eps(jnp.asarray(inp.numpy()), t), np.float64))
        nfe += 1
        x = scheduler.step(eps, n, x).prev_sample
    return x.numpy().astype(np.float64), t_first, denoised, nfe


def run_diffusers(torch, diffusers, problem, args, log):
    results, medians, skipped = {}, {}, []
    for label, spacing, factory, per in diffusers_configs(diffusers):
        t0 = time.perf_counter()
        for nfe in args.nfes:
            steps = steps_for(nfe, per) if per > 1 else nfe
            if steps is None:
                skipped.append(f"{label} {spacing} at NFE {nfe} (NFE = {per} steps - 1)")
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                x, t_first, denoised, calls = run_diffusers_once(torch, problem, factory(), steps)
            assert calls == nfe, (label, spacing, nfe, calls)
            rms, med = problem.errors(x, t_first, denoised)
            results[(label, spacing, nfe)] = rms
            medians[(label, spacing, nfe)] = med
        log(f"  diffusers {label:14s} {spacing:8s} {time.perf_counter() - t0:5.1f}s")
    return results, medians, skipped


# ----------------------------------------------------------------------------------------------
# 2. Overhead per step with a trivial denoiser


def _best_time(fn, repeats):
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def overhead(torch, diffusers, args):
    steps = args.overhead_steps
    linear = lambda x_t, t: 0.5 * x_t  # a trivially cheap denoiser
    base = {"num_train_timesteps": N_TRAIN, "beta_schedule": "linear"}
    pairs = [
        ("ddim", {}, lambda: diffusers.DDIMScheduler(**base, set_alpha_to_one=True, clip_sample=False)),
        ("euler", {}, lambda: diffusers.EulerDiscreteScheduler(**base)),
        ("dpmpp_2m", {}, lambda: diffusers.DPMSolverMultistepScheduler(**base, algorithm_type="dpmsolver++")),
        ("unipc", {}, lambda: diffusers.UniPCMultistepScheduler(**base)),
        ("deis", {"order": 2}, lambda: diffusers.DEISMultistepScheduler(**base)),
    ]
    rows = []
    with jax.enable_x64(False):
        process = difflax.DiscreteVP.linear()
        x = jax.random.normal(jax.random.key(0), (args.overhead_batch, args.dim), jnp.float32)
        for name, kwargs, factory in pairs:
            if name not in SOLVERS:
                continue
            f = jax.jit(
                lambda x, name=name, kwargs=kwargs: difflax.sample(linear, process, x, name, steps, **kwargs)[0]
            )
            f(x).block_until_ready()

            sample = torch.from_numpy(np.array(x))
            out = 0.5 * sample

            def loop(factory=factory):
                sched = factory()
                sched.set_timesteps(steps)
                timesteps = sched.timesteps
                t0 = time.perf_counter()
                s = sample
                for n in timesteps:
                    sched.scale_model_input(s, n)
                    s = sched.step(out, n, s).prev_sample
                return time.perf_counter() - t0

            t_difflax = t_diffusers = math.inf
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(args.repeats):  # interleaved minima: both see the same load
                    t_difflax = min(t_difflax, _best_time(lambda f=f: f(x).block_until_ready(), 4) / steps)
                    t_diffusers = min(t_diffusers, loop() / steps)
            rows.append((name, t_difflax, t_diffusers, t_diffusers / t_difflax))
    return rows


# ----------------------------------------------------------------------------------------------
# 3. Jitted sampler vs NFE x denoiser time for a costly denoiser


def _x_and_nfe(result):
    x, info = result
    return x, info["nfe"]


def fidelity(args):
    batch, dim = args.mlp_batch, args.dim
    widths = (256, 384, 512, 768, 1024, 1536)
    with jax.enable_x64(False):
        process = difflax.DiscreteVP.linear()
        x = jax.random.normal(jax.random.key(0), (batch, dim), jnp.float32)
        t = jnp.full((batch,), 0.5, jnp.float32)
        for width in widths:
            keys = jax.random.split(jax.random.key(1), args.mlp_depth + 1)
            sizes = [dim + 1, *([width] * args.mlp_depth), dim]
            weights = [
                jax.random.normal(k, (i, o), jnp.float32) / np.sqrt(i)
                for k, i, o in zip(keys, sizes[:-1], sizes[1:], strict=False)
            ]

            def mlp(x_t, t, weights=weights):
                h = jnp.concatenate([x_t, t[:, None]], axis=-1)
                for w in weights[:-1]:
                    h = jax.nn.gelu(h @ w)
                return x_t - 0.1 * (h @ weights[-1])

            den = jax.jit(mlp)
            den(x, t).block_until_ready()
            t_den = _best_time(lambda den=den: den(x, t).block_until_ready(), 20)
            if t_den >= args.mlp_ms * 1e-3 or width == widths[-1]:
                break
        rows = []
        for solver, steps in (("ddim", 10), ("dpmpp_2m", 20), ("heun", 10)):
            if solver not in SOLVERS:
                continue
            f = jax.jit(
                lambda x, solver=solver, steps=steps: _x_and_nfe(difflax.sample(mlp, process, x, solver, steps))
            )
            nfe = int(f(x)[1])

            def calls(nfe=nfe):  # NFE back-to-back calls of the jitted denoiser alone
                y = x
                for _ in range(nfe):
                    y = den(y, t)
                return y.block_until_ready()

            # Back-to-back pairs of runs of the same length see the same load from other
            # processes; the median of the per-pair ratios is robust to the pairs that do not.
            pairs = np.array(
                [
                    (_best_time(calls, 1), _best_time(lambda f=f: jax.block_until_ready(f(x)), 1))
                    for _ in range(4 * args.repeats)
                ]
            )
            ratios = pairs[:, 1] / pairs[:, 0]
            q1, med, q3 = np.percentile(ratios, [25, 50, 75])
            t_calls, t_sample = np.median(pairs, axis=0)
            rows.append((solver, nfe, t_calls / nfe, t_sample, med, q3 - q1))
    return width, rows


# ----------------------------------------------------------------------------------------------
# Report


def print_table(title, results, labels, grids, nfes, log):
    log(f"\n{title}")
    head = f"{'solver':16s} {'grid':10s} " + " ".join(f"{'NFE ' + str(n):>9s}" for n in nfes)
    log(head)
    log("-" * len(head))
    for label in labels:
        for g in grids:
            if not any((label, g, n) in results for n in nfes):
                continue
            log(f"{label:16s} {g:10s} " + " ".join(f"{fmt(results.get((label, g, n))):>9s}" for n in nfes))


def best(results, nfe, medians=None):
    items = [(v, k) for k, v in results.items() if k[2] == nfe and np.isfinite(v)]
    if not items:
        return None
    v, k = min(items)
    return v, k, (medians[k] if medians else None)


def plot(path, dl_results, df_results, dl_labels, df_labels, nfes):
    """Best RMS error per method against NFE: difflax solid, diffusers dashed, learned samplers thick; every
    method its own marker and colour, so curves stay apart in grey scale too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    fig, ax = plt.subplots(figsize=(10, 6.5))
    markers = "osD^vP*Xhp<>d8H"

    def curve(results, label):
        by_nfe = {}
        for (lab, _, nfe), v in results.items():
            if lab == label and np.isfinite(v):
                by_nfe[nfe] = min(v, by_nfe.get(nfe, np.inf))
        return sorted(by_nfe.items())

    for i, label in enumerate(dl_labels):
        learned = label.startswith(("ld3", "epd"))
        if pts := curve(dl_results, label):
            ax.plot(*np.transpose(pts), "-", marker=markers[i % len(markers)], color=plt.get_cmap("tab10")(i % 10),
                    lw=2.6 if learned else 1.2, ms=7 if learned else 5, label=f"difflax {label}")  # fmt: skip
    for i, label in enumerate(df_labels):
        if pts := curve(df_results, label):
            ax.plot(*np.transpose(pts), "--", marker=markers[i % len(markers)], mfc="none", lw=1.0, ms=6,
                    color=plt.get_cmap("Dark2")(i % 8), label=f"diffusers {label}")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(FixedLocator(nfes))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(n) for n in nfes], fontsize=11)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    ax.tick_params(axis="y", which="both", labelsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_xlabel("NFE (denoiser evaluations)", fontsize=12)
    ax.set_ylabel("RMS error vs exact ODE sample (best grid / spacing)", fontsize=12)
    ax.set_title("Gaussian mixture, exact denoiser, DDPM linear schedule (test draws)", fontsize=12)
    ax.legend(fontsize=7.5, ncol=1, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--num", type=int, default=512, help="test draws")
    parser.add_argument("--calibration", type=int, default=64, help="calibration draws for the optimized grids")
    parser.add_argument("--candidates", type=int, default=64, help="candidate times of the optimized grids")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--components", type=int, default=8)
    parser.add_argument("--std", type=float, default=0.08)
    parser.add_argument("--reference-points", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--overhead-batch", type=int, default=16, help="batch of the overhead measurement")
    parser.add_argument("--overhead-steps", type=int, default=100)
    parser.add_argument("--mlp-ms", type=float, default=2.0, help="target cost of the costly denoiser")
    parser.add_argument("--mlp-batch", type=int, default=64)
    parser.add_argument("--mlp-depth", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nfes", default="5,10,20", help="comma-separated NFE values")
    parser.add_argument("--solvers", default=",".join(c[0] for c in DIFFLAX), help="difflax solvers (labels) to run")
    parser.add_argument(
        "--learned", default="ld3-dpmpp_2m,ld3-ipndm,ld3-unipc-bh2,epd-K1,epd-K2", help="learned samplers"
    )
    parser.add_argument("--accuracy-only", action="store_true", help="skip the overhead and cost measurements")
    args = parser.parse_args(argv)
    args.nfes = tuple(int(n) for n in args.nfes.split(","))
    args.solvers = tuple(args.solvers.split(","))
    args.learned = tuple(args.learned.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    lines = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    try:
        import diffusers
        import torch
    except ImportError as err:  # the bench extra
        raise SystemExit(f"benchmarks.solvers needs the bench extra (torch CPU and diffusers): {err}") from None
    torch.set_num_threads(1)

    problem = Problem(args)
    log(
        f"Gaussian mixture: dim {args.dim}, {args.components} components of std {args.std}; "
        f"DiscreteVP.linear(); {args.num} test draws, {args.calibration} calibration draws; float64"
    )
    log(
        f"reference: {args.reference_points} log-SNR points x 8 DPM-Solver-2 substeps; "
        f"max deviation from a 4x coarser solve {problem.reference_check():.1e}"
    )

    log(
        f"benchmark sampler (padded grids, one compile per solver) vs difflax.sample: "
        f"max diff {check_sampler(problem):.1e}"
    )
    log("\n[1/3] accuracy (progress)")
    dl, dl_med, dl_grids, dl_skip, fit_time = run_difflax(problem, args, log)
    ld, ld_med, ld_skip, ld_time, transfer = run_learned(problem, args, log)
    dl, dl_med, fit_time = {**dl, **ld}, {**dl_med, **ld_med}, {**fit_time, **ld_time}
    dl_skip += ld_skip
    df, df_med, df_skip = run_diffusers(torch, diffusers, problem, args, log)
    t_accuracy = time.perf_counter() - start

    dl_labels = [c[0] for c in DIFFLAX if c[0] in args.solvers] + list(dict.fromkeys(k[0] for k in ld))
    df_labels = list(dict.fromkeys(c[0] for c in diffusers_configs(diffusers)))
    df_spacings = ("leading", "trailing", "linspace", "karras", "lu")
    grids = (*GRIDS, "learned")
    print_table("difflax: RMS error against the exact ODE endpoint", dl, dl_labels, grids, args.nfes, log)
    print_table("difflax: median error against the exact ODE endpoint", dl_med, dl_labels, grids, args.nfes, log)
    print_table("diffusers: RMS error against the exact ODE endpoint", df, df_labels, df_spacings, args.nfes, log)
    print_table(
        "diffusers: median error against the exact ODE endpoint", df_med, df_labels, df_spacings, args.nfes, log
    )
    print_table("fitting time (s, compilation included)", fit_time, dl_labels, grids, args.nfes, log)
    print_table(
        "learned samplers on a second mixture they were not fitted on: RMS", transfer, dl_labels, grids, args.nfes, log
    )
    log("\nNFE not matched exactly (skipped): " + "; ".join(dl_skip + df_skip))

    log("\nbest configuration per NFE (RMS / median error):")
    ratios = {}
    for nfe in args.nfes:
        b_dl, b_df = best(dl, nfe, dl_med), best(df, nfe, df_med)
        ratios[nfe] = b_dl[0] / b_df[0]
        log(
            f"  NFE {nfe:2d}: difflax {b_dl[1][0]} / {b_dl[1][1]}: {b_dl[0]:.4f} / {b_dl[2]:.4f}   "
            f"diffusers {b_df[1][0]} / {b_df[1][1]}: {b_df[0]:.4f} / {b_df[2]:.4f}   ratio {ratios[nfe]:.2f}"
        )
    log("best configuration per NFE by median error (typical draw, mode changes excluded):")
    for nfe in args.nfes:
        m_dl, m_df = best(dl_med, nfe), best(df_med, nfe)
        log(
            f"  NFE {nfe:2d}: difflax {m_dl[1][0]} / {m_dl[1][1]}: {m_dl[0]:.4f}   "
            f"diffusers {m_df[1][0]} / {m_df[1][1]}: {m_df[0]:.4f}   ratio {m_dl[0] / m_df[0]:.2f}"
        )

    rows, frows = [], []
    if not args.accuracy_only:
        log(
            f"\n[2/3] overhead per step, trivial (linear) denoiser, batch {args.overhead_batch} x {args.dim} float32, "
            f"{args.overhead_steps} steps (best of {args.repeats} loops)"
        )
        rows = overhead(torch, diffusers, args)
        log(f"{'solver':10s} {'difflax us/step':>16s} {'diffusers us/step':>18s} {'ratio':>8s}")
        for name, a, b, r in rows:
            log(f"{name:10s} {a * 1e6:16.1f} {b * 1e6:18.1f} {r:7.0f}x")

        log("\n[3/3] jitted sampler vs NFE x denoiser time (costly MLP denoiser)")
        width, frows = fidelity(args)
        log(f"MLP: batch {args.mlp_batch}, width {width}, depth {args.mlp_depth}")
        log(f"{'solver':10s} {'NFE':>4s} {'denoiser ms':>12s} {'sampler ms':>11s} {'ratio':>7s} {'IQR':>6s}")
        for solver, nfe, t_den, t_s, r, iqr in frows:
            log(f"{solver:10s} {nfe:4d} {t_den * 1e3:12.2f} {t_s * 1e3:11.2f} {r:7.3f} {iqr:6.3f}")
    log("\ntargets:")
    for nfe in (n for n in (5, 10) if n in ratios):
        log(
            f"  NFE {nfe}: difflax best RMS error <= 0.5 x diffusers best: ratio {ratios[nfe]:.2f} -> "
            f"{'HOLDS' if ratios[nfe] <= 0.5 else 'FAILS'}"
        )
    if rows:
        min_ratio, worst = min(r for *_, r in rows), max(r for _, _, _, _, r, _ in frows)
        log(
            f"  overhead ratio diffusers / difflax >= 20x: min {min_ratio:.0f}x -> "
            f"{'HOLDS' if min_ratio >= 20 else 'FAILS'}"
        )
        log(
            f"  jitted sampler time <= 1.05 x NFE x denoiser time: worst median ratio {worst:.3f} -> "
            f"{'HOLDS' if worst <= 1.05 else 'FAILS'}"
        )

    plot(out / "solvers.png", dl, df, dl_labels, df_labels, args.nfes)
    payload = {
        "args": vars(args),
        "difflax": {f"{k[0]}|{k[1]}|{k[2]}": v for k, v in dl.items()},
        "difflax_median": {f"{k[0]}|{k[1]}|{k[2]}": v for k, v in dl_med.items()},
        "diffusers": {f"{k[0]}|{k[1]}|{k[2]}": v for k, v in df.items()},
        "diffusers_median": {f"{k[0]}|{k[1]}|{k[2]}": v for k, v in df_med.items()},
        "optimized_grids": {f"{k[0]}|{k[1]}": v for k, v in dl_grids.items()},
        "fit_seconds": {f"{k[0]}|{k[1]}|{k[2]}": v for k, v in fit_time.items()},
        "second_mixture": {f"{k[0]}|{k[1]}|{k[2]}": v for k, v in transfer.items()},
        "overhead": rows,
        "fidelity": frows,
    }
    (out / "solvers.json").write_text(json.dumps(payload, indent=1))
    log(
        f"\nwrote {out / 'solvers.png'} and {out / 'solvers.json'}; "
        f"accuracy part {t_accuracy:.0f}s, total {time.perf_counter() - start:.0f}s"
    )


if __name__ == "__main__":
    main()
