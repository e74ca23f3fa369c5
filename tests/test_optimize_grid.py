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
# (seed, scale of the means, std, weights): the second has narrow, well separated modes
MIXTURES = ((0, 1.5, 0.3, (0.5, 0.3, 0.2)), (2, 2.0, 0.2, (0.6, 0.3, 0.1)))
STANDARD_GRIDS = ("uniform", "trailing", "logsnr", "karras", "edm")
PROCESS = difflax.DiscreteVP.linear()


def mixture_denoise(gm, x_t, t):
    """The exact denoiser of the mixture ``gm`` (its parameters): one compiled program serves every mixture."""
    return gm.denoiser(PROCESS)(x_t, t)


@functools.cache
def _problem(mixture=0):
    """A 4-D Gaussian mixture under DDPM's linear schedule, calibration draws, and held-out draws (other noise)
    with their exact probability-flow endpoints."""
    seed, scale, std, weights = MIXTURES[mixture]
    rng = np.random.default_rng(seed)
    gm = GaussianMixture.isotropic(scale * rng.normal(size=(len(weights), DIM)), std, weights=list(weights))
    denoise = functools.partial(mixture_denoise, gm)
    calibration = PROCESS.prior_sample(jax.random.key(1), (32, DIM))
    fresh = PROCESS.prior_sample(jax.random.key(2), (256, DIM))
    # The exact ODE endpoint: a fine reference solve to t_min, then the final denoising step.
    fine = difflax.make_grid("logsnr", PROCESS, 60, final_zero=False)
    x_min = reference_trajectory(denoise, PROCESS, fresh, fine, reference_steps=8)[-1]
    exact = denoise(x_min, jnp.full((fresh.shape[0],), PROCESS.t_min))
    return PROCESS, gm, calibration, fresh, exact


@functools.cache
def _optimized(solver, steps, final_zero=True, mixture=0, validation=0.25):
    process, gm, calibration, _, _ = _problem(mixture)
    return optimize_grid(
        mixture_denoise,
        process,
        calibration,
        solver,
        steps,
        params=gm,
        candidates=40,
        final_zero=final_zero,
        validation=validation,
    )


@functools.cache
def _sampler(solver, steps):
    """Jitted sampler with the mixture and the grid as arguments: one compile serves every grid and mixture."""

    @jax.jit
    def run(gm, x, grid):
        denoise = functools.partial(mixture_denoise, gm)
        x, info = difflax.sample(denoise, PROCESS, x, solver=solver, steps=steps, grid=grid, final_zero=True)
        return x, info["nfe"]

    return run


def _errors(solver, steps, grid, mixture=0):
    """Per-draw distances to the exact endpoint on the held-out draws, and the nfe."""
    process, gm, _, fresh, exact = _problem(mixture)
    if isinstance(grid, str):
        grid = difflax.make_grid(grid, process, steps)
    x, nfe = _sampler(solver, steps)(gm, fresh, jnp.asarray(grid, fresh.dtype))
    return np.sqrt(np.sum(np.square(np.asarray(x - exact, np.float64)), axis=-1)), int(nfe)


def _rms_error(solver, steps, grid, mixture=0):
    errors, nfe = _errors(solver, steps, grid, mixture)
    return float(np.sqrt(np.mean(errors**2))), nfe


def test_grid_is_a_valid_decreasing_grid_that_round_trips(tmp_path):
    process = _problem()[0]
    grid = _optimized("ddim", 5, validation=0)  # the optimized grid itself, never a named one
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
    g = np.asarray(_optimized("ddim", 4, final_zero=False, validation=0))
    assert g.shape == (5,)
    assert np.all(np.diff(g) < 0)
    assert g[0] == pytest.approx(process.t_max)
    assert g[-1] == pytest.approx(process.t_min)


@pytest.mark.parametrize("solver,steps", [("ddim", 5), ("dpmpp_2m", 6)])
def test_default_grid_never_loses_to_a_standard_grid_on_held_out_draws(solver, steps):
    """With its default settings (a quarter of the 32 calibration draws held out to choose between the optimized
    grid and the named ones) the grid's RMS error on 256 other draws is at most that of every standard grid,
    trailing included, on two mixtures (the second with narrow, well separated modes)."""
    assert solver in SOLVERS, f"solver {solver!r} is not registered; registered: {sorted(SOLVERS)}"
    for mixture in range(len(MIXTURES)):
        optimized, nfe = _rms_error(solver, steps, _optimized(solver, steps, mixture=mixture), mixture)
        standard = {name: _rms_error(solver, steps, name, mixture)[0] for name in STANDARD_GRIDS}
        assert nfe == steps
        assert optimized <= min(standard.values()) * (1 + 1e-6), (mixture, optimized, standard)


def test_compiled_once_for_new_parameters_and_reports_its_time():
    """Given as ``denoise(params, x, t)`` with ``params=``, another mixture of the same shapes reuses every compiled
    program; ``return_info`` gives the call's time and the held-out errors it chose by."""
    from difflax.solvers import optimize

    process, gm, calibration, _, _ = _problem(1)
    _optimized("ddim", 5, mixture=1)  # compiled for these shapes
    sizes = [f._cache_size() for f in (optimize._reference, optimize._dynamic_program, optimize._grid_errors)]
    moved = gm.replace(means=gm.means + 0.1)
    grid, info = optimize_grid(
        mixture_denoise, process, calibration, "ddim", 5, params=moved, candidates=40, return_info=True
    )
    assert sizes == [f._cache_size() for f in (optimize._reference, optimize._dynamic_program, optimize._grid_errors)]
    assert info["seconds"] > 0 and info["calibration_draws"] == 24 and info["validation_draws"] == 8
    assert info["chosen"] in info["validation_errors"]
    assert min(info["validation_errors"].values()) == info["validation_errors"][info["chosen"]]
    assert np.asarray(grid).shape == (6,) and float(grid[0]) == pytest.approx(process.t_max)


def test_free_end_refine_and_step_ratio_give_valid_grids():
    process, gm, calibration, _, _ = _problem()
    g = np.asarray(
        optimize_grid(
            mixture_denoise,
            process,
            calibration,
            solver="ddim",
            steps=5,
            params=gm,
            candidates=40,
            free_end=True,
            refine=2,
            max_step_ratio=1.5,
            validation=0,
        )
    )
    assert g.shape == (6,) and np.all(np.diff(g) < 0)
    assert g[0] == pytest.approx(process.t_max) and g[-1] == 0.0 and g[-2] >= process.t_min - 1e-7
    h = np.diff(0.5 * np.asarray(process.log_snr(jnp.asarray(g[:-1]))))
    assert np.all(h[1:] <= 1.5 * h[:-1] * (1 + 1e-5)), h


def test_bad_arguments():
    process, gm, calibration, _, _ = _problem()
    denoise = functools.partial(mixture_denoise, gm)
    with pytest.raises(ValueError, match="stochastic"):
        optimize_grid(denoise, process, calibration, solver="ddim", steps=3, eta=1.0)
    with pytest.raises(ValueError, match="candidates allow at most"):
        optimize_grid(denoise, process, calibration, solver="ddim", steps=12, candidates=8)
    with pytest.raises(ValueError, match="Unknown solver"):
        optimize_grid(denoise, process, calibration, solver="nope", steps=3)
    with pytest.raises(ValueError, match="validation must be a fraction"):
        optimize_grid(denoise, process, calibration, solver="ddim", steps=3, validation=1.0)
    with pytest.raises(ValueError, match="leaves 0 held out and 3 to fit"):
        optimize_grid(denoise, process, calibration[:3], solver="ddim", steps=3, validation=0.1)
