"""Learned few-step samplers: LD3 time steps (difflax.solvers.fit_ld3) and EPD (difflax.solvers.fit_epd).

Every fit here uses one denoiser function, ``mixture_denoise(gm, x_t, t)``, with the mixture as its
parameters, so the fits of different mixtures share their compiled programs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import difflax
from difflax.analytic import GaussianMixture
from difflax.solvers import EPD, DPMSolverPP2M, LearnedGrid, fit_epd, fit_ld3, from_arrays, to_arrays
from difflax.solvers.learned import draw_errors, teacher_samples

DIM = 4
PROCESS = difflax.DiscreteVP.linear()
FIT = {"iterations": 150, "learning_rate": 0.1}


def mixture_denoise(gm, x_t, t):
    return gm.denoiser(PROCESS)(x_t, t)


def _mixture(seed, scale, std):
    """Three isotropic components (scale 0: all at one mean, a single Gaussian)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(1 if scale == 0 else 3, DIM)) * max(scale, 1.0)
    means = np.broadcast_to(means, (3, DIM))
    return GaussianMixture.isotropic(jnp.asarray(means, jnp.float32), std, weights=[0.5, 0.3, 0.2])


MIXTURES = {"narrow": _mixture(2, 2.0, 0.2), "gaussian": _mixture(3, 0.0, 0.6)}  # narrow, separated modes; one Gaussian
NARROW = MIXTURES["narrow"]
CALIBRATION = PROCESS.prior_sample(jax.random.key(1), (48, DIM))
HELD_OUT = PROCESS.prior_sample(jax.random.key(2), (48, DIM))  # the calibration's shape: its programs serve
# With narrow modes the RMS is dominated by the few draws per hundred that a sampler sends into another
# mode, so ranking samplers by RMS needs many draws: 48 hold two or none of them.
TEST = PROCESS.prior_sample(jax.random.key(7), (1024, DIM))


@functools.cache
def _exact(name):
    """The exact probability-flow ODE samples of the held-out draws (the fits' teacher)."""
    return teacher_samples(mixture_denoise, MIXTURES[name], PROCESS, HELD_OUT, 32, 8)


@functools.cache
def _exact_test():
    return teacher_samples(mixture_denoise, NARROW, PROCESS, TEST, 32, 8)


def _rms(name, sampler, target=None, draws=HELD_OUT):
    """RMS distance to the exact samples of the held-out draws of a sampler carrying its grid, and its NFE."""
    target = _exact(name) if target is None else target
    errs = draw_errors(mixture_denoise, MIXTURES[name], PROCESS, sampler, draws, target)
    return float(np.sqrt(np.mean(np.asarray(errs)))), sampler.evals_per_step * (sampler.steps - 1) + 1


def _named(steps, make):
    return {g: make(jnp.asarray(difflax.make_grid(g, PROCESS, steps))) for g in ("trailing", "logsnr", "uniform")}


@functools.cache
def _ld3(name="narrow"):
    return fit_ld3(mixture_denoise, PROCESS, CALIBRATION, "dpmpp_2m", steps=4, params=MIXTURES[name], **FIT)


@functools.cache
def _epd():
    return fit_epd(mixture_denoise, PROCESS, CALIBRATION, steps=3, points=2, params=NARROW, **FIT)


def test_ld3_on_one_gaussian_recovers_the_exact_solution():
    """For one Gaussian N(mu, s^2) the ODE is linear and its sample closed-form: from x_T at t_max,
    x(t) = alpha_t mu + sqrt(alpha_t^2 s^2 + sigma_t^2) z with z = (x_T - alpha_T mu) / sqrt(alpha_T^2 s^2 + sigma_T^2),
    and the final denoising step at t_min gives mu + s^2 alpha z / sqrt(alpha^2 s^2 + sigma^2). Three steps on
    the fitted grid of DPM-Solver++(2M) reach it (to the teacher's accuracy), on no named grid."""
    learned, gm = _ld3("gaussian"), MIXTURES["gaussian"]
    mu, s = gm.means[0], 0.6
    alpha, sigma = PROCESS.alpha_sigma(jnp.float32(PROCESS.t_max))
    z = (HELD_OUT - alpha * mu) / jnp.sqrt(alpha**2 * s**2 + sigma**2)
    alpha, sigma = PROCESS.alpha_sigma(jnp.float32(PROCESS.t_min))
    closed = mu + s**2 * alpha * z / jnp.sqrt(alpha**2 * s**2 + sigma**2)
    np.testing.assert_allclose(_exact("gaussian"), closed, atol=5e-3)
    err = _rms("gaussian", learned, closed)[0]
    named = min(_rms("gaussian", g, closed)[0] for g in _named(4, lambda t: LearnedGrid(DPMSolverPP2M(), t)).values())
    assert err < 2e-3 and err < 0.01 * named, (err, named)


@pytest.mark.parametrize("name", ["ld3", "epd"])
def test_held_out_error_is_at_most_the_best_fixed_grid(name):
    """On 1024 draws it was not fitted on, the learned sampler has an RMS error at most that of the same solver on
    the best of the named grids (for EPD: its start, r = 1/3, 2/3 with equal weights, on them), at the same NFE."""
    if name == "ld3":
        learned, fixed = _ld3(), _named(4, lambda t: LearnedGrid(DPMSolverPP2M(), t))
    else:
        r = jnp.broadcast_to(jnp.array([1 / 3, 2 / 3]), (2, 2))
        learned, fixed = _epd(), _named(3, lambda t: EPD(t, r, jnp.full((2, 2), 0.5)))
    err, nfe = _rms("narrow", learned, _exact_test(), TEST)
    fixed = {g: _rms("narrow", sampler, _exact_test(), TEST) for g, sampler in fixed.items()}
    assert {n for _, n in fixed.values()} == {nfe}
    assert err <= min(e for e, _ in fixed.values()) * (1 + 1e-6), (err, fixed)


def test_learned_samplers_run_in_sample_with_their_nfe():
    ld3, epd = _ld3(), _epd()
    assert isinstance(ld3, LearnedGrid) and isinstance(epd, EPD)
    denoise = functools.partial(mixture_denoise, NARROW)
    x, info = difflax.sample(denoise, PROCESS, HELD_OUT[:8], solver=ld3, steps=4)
    assert int(info["nfe"]) == 4 and x.shape == (8, DIM)
    x, info = jax.jit(lambda x: difflax.sample(denoise, PROCESS, x, solver=epd, steps=3))(HELD_OUT[:8])
    assert int(info["nfe"]) == (1 + 2) * 2 + 1 and bool(jnp.all(jnp.isfinite(x)))
    assert np.all(np.diff(np.asarray(epd.times)) < 0) and float(epd.times[-1]) == 0.0
    np.testing.assert_allclose(np.asarray(epd.weights).sum(-1), 1.0, rtol=1e-6)
    assert np.all((np.asarray(epd.r) > 0) & (np.asarray(epd.r) < 1))
    with pytest.raises(ValueError, match="fitted for steps=4"):
        difflax.sample(denoise, PROCESS, HELD_OUT[:8], solver=ld3, steps=5)


def test_fitting_is_deterministic():
    again = fit_ld3(mixture_denoise, PROCESS, CALIBRATION, "dpmpp_2m", steps=4, params=NARROW, **FIT)
    np.testing.assert_array_equal(np.asarray(again.times), np.asarray(_ld3().times))
    again = fit_epd(mixture_denoise, PROCESS, CALIBRATION, steps=3, points=2, params=NARROW, **FIT)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(_epd()), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["ld3", "epd"])
def test_save_load_round_trip(tmp_path, name):
    sampler = _ld3() if name == "ld3" else _epd()
    np.savez(tmp_path / "sampler.npz", **to_arrays(sampler))
    with np.load(tmp_path / "sampler.npz") as data:
        loaded = from_arrays(data)
    assert type(loaded) is type(sampler)
    assert jax.tree.structure(loaded) == jax.tree.structure(sampler)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(sampler), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _rms("narrow", loaded) == _rms("narrow", sampler)


def test_bad_calibration_input_is_named():
    fit = functools.partial(fit_ld3, mixture_denoise, PROCESS, solver="dpmpp_2m", steps=4, params=NARROW, **FIT)
    with pytest.raises(TypeError, match="x_cal must be a floating-point array"):
        fit(np.ones((8, DIM), np.int32))
    with pytest.raises(TypeError, match="x_cal"):
        fit([[0.0] * DIM] * 8)
    with pytest.raises(ValueError, match=r"x_cal must have shape \(draws >= 2"):
        fit(CALIBRATION[0])
    with pytest.raises(ValueError, match="x_cal must be finite"):
        fit(CALIBRATION.at[3, 1].set(jnp.nan))
    with pytest.raises(ValueError, match="validation"):
        fit(CALIBRATION[:3], validation=0.1)
    with pytest.raises(ValueError, match="slack must be a finite non-negative number"):
        fit(CALIBRATION, slack=-1.0)
    with pytest.raises(ValueError, match="deterministic"):
        fit_ld3(mixture_denoise, PROCESS, CALIBRATION, "ddpm", steps=4, params=NARROW)
    with pytest.raises(ValueError, match="grid must be 'best'"):
        fit_epd(mixture_denoise, PROCESS, CALIBRATION, steps=3, grid="nope", params=NARROW)
    with pytest.raises(ValueError, match="arrays hold no sampler"):
        from_arrays({"a": np.zeros(2)})
    with pytest.raises(ValueError, match="arrays name the class 'Evil'"):
        from_arrays({"__class__": np.asarray("Evil")})
