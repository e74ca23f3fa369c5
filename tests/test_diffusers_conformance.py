"""difflax's samplers reproduce diffusers' schedulers step for step (needs the bench extra).

Both sides use the same model: the exact Gaussian-mixture denoiser of a 1000-step DDPM
schedule, read as an eps prediction (``difflax.denoiser_to``) and evaluated at diffusers'
integer timestep ``n`` as difflax time ``t = (n + 1) / N``, in float64; diffusers' timesteps
(or sigmas) are passed to difflax as the grid, ending in the final denoising step.

Precision: diffusers builds its beta table and ``alphas_cumprod`` in float32, whose
cumulative product drifts by ~1e-5 relative over 1000 steps; the schedulers get the
float64 ``alphas_cumprod`` of ``DiscreteVP`` instead (the same schedule, exactly). They
still round their sigmas to float32 and some cast the sample to float32 inside ``step``,
which is what limits the agreement to ~1e-6.

* DDIM (``set_alpha_to_one=True``): the last step to ``alpha_bar = 1`` is the denoising step.
* Euler / Heun discrete: Euler / Heun on the probability-flow ODE of the EDM process in
  ``y = x / alpha``, ``sigma = sqrt((1 - alpha_bar) / alpha_bar)`` (``difflax.solvers.to_edm``).
* DPM-Solver++(2M) and UniPC (bh1, bh2): directly in ``x``, with ``final_sigmas_type="zero"``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import difflax  # noqa: E402
from difflax.analytic import GaussianMixture  # noqa: E402
from difflax.solvers import SOLVERS, to_edm  # noqa: E402

pytestmark = [
    pytest.mark.bench,
    # numpy 2 on diffusers' np.array(torch_tensor): harmless, and not ours.
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]

N_TRAIN = 1000
BATCH, DIM = 6, 3
TOL = 1e-5
SCHEDULES = {"linear": difflax.DiscreteVP.linear, "scaled_linear": difflax.DiscreteVP.scaled_linear}


@functools.cache
def _setup(schedule):
    """Process, exact denoiser, jitted eps model and a fixed x_T, all float64 (built under x64)."""
    with jax.enable_x64(True):
        process = SCHEDULES[schedule]()
        rng = np.random.default_rng(0)
        gm = GaussianMixture.isotropic(rng.normal(size=(4, DIM)), 0.2)
        denoise = jax.jit(gm.denoiser(process))
        eps_fn = jax.jit(difflax.denoiser_to(denoise, process, "eps"))
        x_T = np.random.default_rng(1).normal(size=(BATCH, DIM))
    return process, denoise, eps_fn, x_T


def _torch_model(schedule):
    """``eps(x, n)`` for diffusers: numpy float64 in, torch.float64 out."""
    _, _, eps_fn, _ = _setup(schedule)

    def model(sample, n):
        t = (float(n) + 1.0) / N_TRAIN
        assert float(n) == round(float(n)), "integer timesteps only (the model's table)"
        with jax.enable_x64(True):
            eps = eps_fn(jnp.asarray(sample.numpy(), jnp.float64), jnp.full((sample.shape[0],), t, jnp.float64))
            return torch.from_numpy(np.array(eps, np.float64))

    return model


def _float64_tables(scheduler, process):
    """Give a diffusers scheduler the float64 schedule of ``process`` (see the module docstring)."""
    abar = torch.from_numpy(np.array(process.alphas_cumprod, np.float64))
    scheduler.alphas_cumprod = abar
    scheduler.alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    scheduler.betas = 1.0 - scheduler.alphas
    if hasattr(scheduler, "alpha_t"):  # multistep solvers tabulate these at construction
        scheduler.alpha_t = abar.sqrt()
        scheduler.sigma_t = (1.0 - abar).sqrt()
        scheduler.lambda_t = scheduler.alpha_t.log() - scheduler.sigma_t.log()
    return scheduler


def _config(schedule):
    return {"num_train_timesteps": N_TRAIN, "beta_schedule": schedule, "prediction_type": "epsilon"}


def _difflax_sample(denoise, process, x_T, solver, grid, **kwargs):
    with jax.enable_x64(True):
        grid = jnp.asarray(np.asarray(grid, np.float64))
        x, info = difflax.sample(
            denoise, process, jnp.asarray(x_T), solver=solver, steps=len(grid) - 1, grid=grid, **kwargs
        )
        return np.asarray(x, np.float64), int(info["nfe"])


def _vp_grid(timesteps):
    """diffusers' integer timesteps -> difflax times ``(n + 1) / N``, then the final 0."""
    n = np.asarray(timesteps, np.float64)
    return np.concatenate([(n + 1.0) / N_TRAIN, [0.0]])


def _run_vp_scheduler(scheduler, schedule, x_T, *, scale_input=False):
    model = _torch_model(schedule)
    x = torch.from_numpy(x_T.copy())
    calls = 0
    for n in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, n) if scale_input else x
        eps = model(inp, n)
        calls += 1
        x = scheduler.step(eps, n, x).prev_sample
    return x.numpy().astype(np.float64), calls


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [10, 25])
def test_ddim(schedule, spacing, steps):
    process, denoise, _, x_T = _setup(schedule)
    sched = diffusers.DDIMScheduler(
        **_config(schedule), set_alpha_to_one=True, clip_sample=False, timestep_spacing=spacing
    )
    sched = _float64_tables(sched, process)
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    sched.set_timesteps(steps)
    want, calls = _run_vp_scheduler(sched, schedule, x_T)
    got, nfe = _difflax_sample(denoise, process, x_T, "ddim", _vp_grid(sched.timesteps))
    assert nfe == calls == steps
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def _edm_run(scheduler, schedule, solver, steps):
    """Run a sigma-space scheduler and difflax's ``solver`` on the EDM form of the same model."""
    process, denoise, _, x_T = _setup(schedule)
    scheduler = _float64_tables(scheduler, process)
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.numpy().astype(np.float64)
    grid = np.unique(sigmas)[::-1]  # Heun repeats every interior sigma
    y_T = x_T * np.sqrt(grid[0] ** 2 + 1.0)  # x / alpha with alpha = 1 / sqrt(sigma^2 + 1)
    want, calls = _run_vp_scheduler(scheduler, schedule, y_T, scale_input=True)
    with jax.enable_x64(True):
        denoise_edm, edm = to_edm(denoise, process)
        got, nfe = _difflax_sample(denoise_edm, edm, y_T, solver, grid)
    return got, want, nfe, calls, grid


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [10, 25])
def test_euler_discrete(schedule, spacing, steps):
    sched = diffusers.EulerDiscreteScheduler(
        **_config(schedule), interpolation_type="linear", timestep_spacing=spacing, final_sigmas_type="zero"
    )
    got, want, nfe, calls, grid = _edm_run(sched, schedule, "euler", steps)
    assert len(grid) == steps + 1 and nfe == calls == steps
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [10, 25])
def test_heun_discrete(schedule, spacing, steps):
    sched = diffusers.HeunDiscreteScheduler(**_config(schedule), timestep_spacing=spacing)
    got, want, nfe, calls, grid = _edm_run(sched, schedule, "heun", steps)
    assert len(grid) == steps + 1 and nfe == calls == 2 * steps - 1
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def _multistep(scheduler, schedule, solver, steps, *, final="zero", limit_last=False, **solver_args):
    """A multistep scheduler in ``x`` against difflax's ``solver`` on the same grid.

    ``final="sigma_min"``: diffusers' last step goes to ``sigma`` of timestep 0, i.e. difflax
    time ``1 / N`` without the final denoising step. ``limit_last``: replace diffusers' last
    step (to ``sigma = 0``) by its limit, the model's ``x0`` at the last sample.
    """
    assert solver in SOLVERS, f"solver {solver!r} is not registered; registered: {sorted(SOLVERS)}"
    process, denoise, _, x_T = _setup(schedule)
    scheduler = _float64_tables(scheduler, process)
    scheduler.set_timesteps(steps)
    model = _torch_model(schedule)
    x, calls = torch.from_numpy(x_T.copy()), 0
    for i, n in enumerate(scheduler.timesteps):
        eps = model(x, n)
        calls += 1
        if limit_last and i == len(scheduler.timesteps) - 1:
            x = scheduler.convert_model_output(eps, sample=x)
        else:
            x = scheduler.step(eps, n, x).prev_sample
    want = x.numpy().astype(np.float64)
    grid = _vp_grid(scheduler.timesteps)
    if final == "sigma_min":
        grid[-1] = 1.0 / N_TRAIN
    got, nfe = _difflax_sample(denoise, process, x_T, solver, grid, **solver_args)
    assert nfe == calls == steps
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("steps", [10, 25])
def test_dpmpp_2m(schedule, spacing, steps):
    sched = diffusers.DPMSolverMultistepScheduler(
        **_config(schedule),
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        final_sigmas_type="zero",
        lower_order_final=True,
        timestep_spacing=spacing,
    )
    _multistep(sched, schedule, "dpmpp_2m", steps)


def _unipc_scheduler(schedule, variant, final):
    sched = diffusers.UniPCMultistepScheduler(
        **_config(schedule),
        solver_order=2,
        solver_type=variant,
        predict_x0=True,
        lower_order_final=True,
        final_sigmas_type=final,
    )
    assert sched.predict_x0
    return sched


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("steps", [10, 25])
def test_unipc_bh2(schedule, final, steps):
    sched = _unipc_scheduler(schedule, "bh2", final)
    _multistep(sched, schedule, "unipc", steps, final=final, order=2, variant="bh2")


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("steps", [10, 25])
def test_unipc_bh1(schedule, final, steps):
    # diffusers 0.42's bh1 returns NaN on its last step to sigma = 0: with h = inf it forms
    # B(h) = hh = -inf and multiplies it by the (empty, zero) first-order correction. That
    # step's limit is the model's x0 (as for bh2), so with "zero" it is taken directly.
    sched = _unipc_scheduler(schedule, "bh1", final)
    _multistep(sched, schedule, "unipc", steps, final=final, limit_last=final == "zero", order=2, variant="bh1")
