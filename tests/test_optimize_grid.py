"""Optimal Stepsize Distillation grids (difflax.solvers.optimize_grid)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import difflax
from difflax.analytic import GaussianMixture
from difflax.solvers import SOLVERS, optimize_grid
from difflax.solvers.optimize import reference_trajectory

DIM = 4


@functools.cache
def _problem():
    """A 4-D Gaussian mixture under DDPM's linear schedule, its exact denoiser and draws."""
    rng = np.random.default_rng(0)
    gm = GaussianMixture.isotropic(1.5 * rng.normal(size=(3, DIM)), 0.3, weights=[0.5, 0.3, 0.2])
    process = difflax.DiscreteVP.linear()
    denoise = jax.jit(gm.denoiser(process))  # traced once per shape: keeps the tests fast
    calibration = process.prior_sample(jax.random.key(1), (16, DIM))
    fresh = process.prior_sample(jax.random.key(2), (256, DIM))
    # The exact ODE endpoint: a fine reference solve to t_min, then the final denoising step.
    fine = difflax.make_grid("logsnr", process, 60, final_zero=False)
    x_min = reference_trajectory(denoise, process, fresh, fine, reference_steps=8)[-1]
    exact = denoise(x_min, jnp.full((fresh.shape[0],), process.t_min))
    return process, denoise, calibration, fresh, exact


@functools.cache
def _optimized(solver, steps, final_zero=True):
    process, denoise, calibration, _, _ = _problem()
    return optimize_grid(
        denoise, process, calibration, solver=solver, steps=steps, candidates=40, final_zero=final_zero
    )


@functools.cache
def _sampler(solver, steps):
    """Jitted sampler with the grid as an argument: one compile serves every grid."""
    process, denoise, _, _, _ = _problem()

    @jax.jit
    def run(x, grid):
        x, info = difflax.sample(denoise, process, x, solver=solver, steps=steps, grid=grid, final_zero=True)
        return x, info["nfe"]

    return run


def _rms_error(solver, steps, grid):
    process, _, _, fresh, exact = _problem()
    if isinstance(grid, str):
        grid = difflax.make_grid(grid, process, steps)
    x, nfe = _sampler(solver, steps)(fresh, jnp.asarray(grid, fresh.dtype))
    return float(jnp.sqrt(jnp.mean(jnp.sum((x - exact) ** 2, axis=-1)))), int(nfe)


def test_grid_is_a_valid_decreasing_grid_that_round_trips(tmp_path):
    process = _problem()[0]
    grid = _optimized("ddim", 5)
    g = np.asarray(grid)
    assert g.shape == (6,)
    assert np.all(np.diff(g) < 0)
    assert g[0] == pytest.approx(process.t_max)
    assert g[-1] == 0.0
    assert g[-2] == pytest.approx(process.t_min)
    np.save(tmp_path / "grid.npy", g)
    loaded = np.load(tmp_path / "grid.npy")
    err_saved, nfe = _rms_error("ddim", 5, loaded)
    assert nfe == 5
    assert err_saved == pytest.approx(_rms_error("ddim", 5, grid)[0], rel=1e-6)


def test_without_final_zero_the_grid_ends_at_t_min():
    process = _problem()[0]
    g = np.asarray(_optimized("ddim", 4, final_zero=False))
    assert g.shape == (5,)
    assert np.all(np.diff(g) < 0)
    assert g[0] == pytest.approx(process.t_max)
    assert g[-1] == pytest.approx(process.t_min)


@pytest.mark.parametrize("solver,steps", [("ddim", 5), ("dpmpp_2m", 6)])
def test_optimized_grid_beats_every_standard_grid(solver, steps):
    if solver not in SOLVERS:
        pytest.skip(f"solver {solver!r} is not registered")
    optimized, _ = _rms_error(solver, steps, _optimized(solver, steps))
    standard = {name: _rms_error(solver, steps, name)[0] for name in ("uniform", "logsnr", "karras")}
    assert optimized < min(standard.values()), (optimized, standard)


def test_free_end_refine_and_step_ratio_give_valid_grids():
    process, denoise, calibration, _, _ = _problem()
    g = np.asarray(
        optimize_grid(
            denoise,
            process,
            calibration,
            solver="ddim",
            steps=5,
            candidates=40,
            free_end=True,
            refine=2,
            max_step_ratio=1.5,
        )
    )
    assert g.shape == (6,) and np.all(np.diff(g) < 0)
    assert g[0] == pytest.approx(process.t_max) and g[-1] == 0.0 and g[-2] >= process.t_min - 1e-7
    h = np.diff(0.5 * np.asarray(process.log_snr(jnp.asarray(g[:-1]))))
    assert np.all(h[1:] <= 1.5 * h[:-1] * (1 + 1e-5)), h


def test_bad_arguments():
    process, denoise, calibration, _, _ = _problem()
    with pytest.raises(ValueError, match="stochastic"):
        optimize_grid(denoise, process, calibration, solver="ddim", steps=3, eta=1.0)
    with pytest.raises(ValueError, match="candidates allow at most"):
        optimize_grid(denoise, process, calibration, solver="ddim", steps=12, candidates=8)
    with pytest.raises(ValueError, match="Unknown solver"):
        optimize_grid(denoise, process, calibration, solver="nope", steps=3)
