"""Stochastic samplers draw from the data distribution; the adaptive ODE solver is accurate.

Data: a 2-D mixture of three well-separated isotropic Gaussians with unequal weights
and widths, whose exact denoiser stands in for a perfectly trained network. For each
sampler we draw ``N`` samples and compare with the exact mixture

* mean and covariance: ``|estimate - exact| <= 4 standard errors + a stated
  discretization tolerance`` (mean: 0.02 absolute; covariance entry ``ij``:
  ``2% of sqrt(S_ii S_jj)``, i.e. the bias of 200 first-order steps), and
* mixture weights, recovered by the most probable component of each sample under
  the exact component posterior: ``|fraction - w_k| <= 4 standard errors + 0.01``.

Annealed Langevin dynamics is a much slower sampler: its unadjusted Langevin steps
shift the mode weights by ~1.5% at affordable step sizes (measured), so its tolerance
is 0.03 on the weights and 0.05 on the mean.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate

from difflax import EDM, VE, VP, Flow, analytic, sample
from difflax.solvers import SOLVERS, get_solver
from difflax.solvers.adaptive import Adaptive, solve_ode
from difflax.solvers.ode import velocity

MEANS = [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]]
STDS = [0.3, 0.5, 0.4]
WEIGHTS = [0.5, 0.3, 0.2]
N = 20_000


def _mixture(dtype=jnp.float32):
    return analytic.GaussianMixture.isotropic(jnp.asarray(MEANS, dtype), jnp.asarray(STDS, dtype), weights=WEIGHTS)


def _check_distribution(x, gm, mean_tol=0.02, cov_rel_tol=0.02, weight_tol=0.01):
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    assert np.all(np.isfinite(x))
    mean, cov = np.asarray(gm.mean(), np.float64), np.asarray(gm.covariance(), np.float64)
    w = np.exp(np.asarray(gm.log_weights, np.float64))

    m = x.mean(0)
    se_m = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(m - mean) <= 4 * se_m + mean_tol), (m, mean, se_m)

    centred = x - m
    prods = centred[:, :, None] * centred[:, None, :]
    c = prods.mean(0)
    se_c = prods.std(0) / np.sqrt(n)
    scale = np.sqrt(np.outer(np.diag(cov), np.diag(cov)))
    assert np.all(np.abs(c - cov) <= 4 * se_c + cov_rel_tol * scale), (c, cov, se_c)

    comp = np.asarray(gm.component_posterior(jnp.asarray(x, gm.means.dtype), 1.0, 0.0)).argmax(-1)
    frac = np.bincount(comp, minlength=len(w)) / n
    se_w = np.sqrt(w * (1 - w) / n)
    assert np.all(np.abs(frac - w) <= 4 * se_w + weight_tol), (frac, w, se_w)
    return m, c, frac


CASES = [
    # name, process, solver, steps, solver kwargs
    ("ddpm_beta_tilde", VP(), "ddpm", 200, {}),
    ("ddpm_beta", VP(), "ddpm", 200, {"variance": "beta"}),
    ("ddim_eta1", VP(), "ddim", 200, {"eta": 1.0}),
    ("euler_maruyama_vp", VP(), "euler_maruyama", 200, {}),
    ("euler_maruyama_ve", VE(), "euler_maruyama", 200, {}),
    ("pc_ve_reverse_diffusion", VE(), "pc", 200, {"norm": "batch"}),
    ("pc_vp_euler_maruyama", VP(), "pc", 200, {"predictor": "euler_maruyama", "norm": "batch"}),
    ("edm_churn", EDM(), "edm", 100, {"s_churn": 40.0}),
]


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_stochastic_sampler_distribution(index):
    name, process, solver, steps, kwargs = CASES[index]
    gm = _mixture()
    key_T, key = jax.random.split(jax.random.key(100 + index))
    x_T = process.prior_sample(key_T, (N, 2))
    run = jax.jit(lambda x, k: sample(gm.denoiser(process), process, x, solver=solver, steps=steps, key=k, **kwargs))
    start = time.perf_counter()
    x, info = run(x_T, key)
    x.block_until_ready()
    per_step = {"pc": 1 + kwargs.get("corrector_steps", 1), "edm": 2}.get(solver, 1)
    assert int(info["nfe"]) == per_step * (steps - 1) + 1
    _check_distribution(x, gm)
    print(f"{name}: {time.perf_counter() - start:.1f}s")


def test_ald_distribution():
    """Annealed Langevin dynamics on a VE process (NCSN's geometric noise levels)."""
    gm = _mixture()
    process = VE(sigma_max=10.0)
    x_T = process.prior_sample(jax.random.key(11), (10_000, 2))
    steps, n_each = 30, 40
    den = gm.denoiser(process)
    ald = {"step_lr": 4e-6, "n_steps_each": n_each}
    run = jax.jit(lambda x, k: sample(den, process, x, solver="ald", steps=steps, key=k, **ald))
    x, info = run(x_T, jax.random.key(12))
    assert int(info["nfe"]) == n_each * (steps - 1) + 1
    _check_distribution(x, gm, mean_tol=0.05, cov_rel_tol=0.03, weight_tol=0.03)


def test_pc_per_example_norm_on_64d_mixture():
    """The default per-example step-size rule where norms concentrate (D = 64).

    Weights and means must be right; the within-mode variance carries the documented
    O(1/D) bias of a state-dependent Langevin step (measured +8-10%, allowed 15%).
    """
    d = 64
    means = jnp.stack([0.7 * jnp.ones(d), -0.7 * jnp.ones(d)])
    gm = analytic.GaussianMixture.isotropic(means, jnp.asarray([0.5, 0.8]), weights=[0.6, 0.4])
    process = VE()
    x_T = process.prior_sample(jax.random.key(5), (2000, d))
    x, info = jax.jit(lambda x, k: sample(gm.denoiser(process), process, x, solver="pc", steps=100, key=k))(
        x_T, jax.random.key(6)
    )
    assert int(info["nfe"]) == 2 * 99 + 1
    x = np.asarray(x)
    comp = (x.mean(1) < 0).astype(int)
    frac = np.bincount(comp, minlength=2) / x.shape[0]
    assert abs(frac[0] - 0.6) <= 4 * np.sqrt(0.24 / x.shape[0]) + 0.01, frac
    # Within-component spread, pooled over the 64 coordinates.
    for k, std in enumerate([0.5, 0.8]):
        xs = x[comp == k]
        var = xs.var(0).mean()
        assert abs(var / std**2 - 1) < 0.15, (k, var)
        assert np.abs(xs.mean(0) - np.asarray(means[k])).max() < 5 * std / np.sqrt(len(xs)) + 0.02


def test_pc_norm_per_example_keeps_examples_independent():
    """Corrector-only PC (``predictor="none"``): example 0 ignores the rest of the batch unless ``norm="batch"``."""
    gm = _mixture()
    process = VE()
    x_T = process.prior_sample(jax.random.key(0), (8, 2))
    other = x_T.at[1:].multiply(3.0)
    den = gm.denoiser(process)
    pc = {"predictor": "none", "corrector_steps": 2, "key": jax.random.key(1)}
    for norm in ("example", "batch"):
        go = jax.jit(lambda x: sample(den, process, x, solver="pc", steps=5, norm=norm, **pc))
        (x, info), (y, _) = go(x_T), go(other)
        assert int(info["nfe"]) == 2 * 4 + 1
        assert np.allclose(x[0], y[0], rtol=1e-6) == (norm == "example")


def test_sde_solvers_registered_and_validated():
    for name in ("euler_maruyama", "pc", "ald", "adaptive"):
        assert name in SOLVERS
    with pytest.raises(ValueError, match="predictor"):
        get_solver("pc", predictor="langevin")
    with pytest.raises(ValueError, match="norm"):
        get_solver("pc", norm="mean")
    with pytest.raises(ValueError, match="n_steps_each"):
        get_solver("ald", n_steps_each=0)
    with pytest.raises(ValueError, match="method"):
        get_solver("adaptive", method="rk4")
    gm = _mixture()
    with pytest.raises(ValueError, match="key"):
        sample(gm.denoiser(VP()), VP(), jnp.zeros((2, 2)), solver="euler_maruyama", steps=3)


# ---------------------------------------------------------------------------- adaptive solver


def _scipy_reference(gm, process, x_T, t_end):
    """DOP853 in process time at rtol 1e-12: independent of diffrax and of the flow coordinates."""
    den = gm.denoiser(process)
    vf = jax.jit(lambda t, x: velocity(den, process, x, t))
    shape = x_T.shape
    sol = scipy.integrate.solve_ivp(
        lambda t, y: np.asarray(vf(jnp.asarray(t), jnp.asarray(y).reshape(shape))).ravel(),
        (float(process.t_max), float(t_end)),
        np.asarray(x_T, np.float64).ravel(),
        method="DOP853",
        rtol=1e-12,
        atol=1e-12,
    )
    assert sol.success
    return sol.y[:, -1].reshape(shape)


@pytest.mark.parametrize("process", [VP(), Flow()], ids=["vp", "flow"])
def test_adaptive_matches_reference(x64, process):
    """Against scipy; the flow interpolant starts at t = 1, where alpha = 0 (r = 1 in the flow coordinates)."""
    gm = _mixture(jnp.float64)
    x_T = process.prior_sample(jax.random.key(3), (16, 2), jnp.float64)
    ref = _scipy_reference(gm, process, x_T, process.t_min)
    run = jax.jit(lambda x, solver: sample(gm.denoiser(process), process, x, solver=solver, steps=2, final_zero=False))
    errors, nfes = [], []
    for tol in (1e-4, 1e-6, 1e-8):
        x, info = run(x_T, Adaptive(rtol=tol, atol=tol))
        errors.append(float(np.abs(np.asarray(x) - ref).max()))
        nfes.append(int(info["nfe"]))
        assert bool(info["success"]) and int(info["steps"]) > 0
    print(type(process).__name__, "max error", errors, "nfe", nfes)
    # Global error tracks the local tolerance (within the usual factor for ~1-10 units of solution).
    assert errors[1] < 1e-4 and errors[2] < 1e-6
    assert errors[0] > errors[2]
    assert 0 < nfes[0] < nfes[1] < nfes[2]


def test_adaptive_nfe_formula_matches_a_counter(x64):
    """``nfe`` equals the number of denoiser calls actually made (host-side counter)."""
    gm = _mixture(jnp.float64)
    process = VP()
    den = gm.denoiser(process)
    calls = []

    def counted(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return den(x, t)

    x_T = process.prior_sample(jax.random.key(3), (8, 2), jnp.float64)
    run = jax.jit(lambda x, solver: sample(counted, process, x, solver=solver, steps=5))  # ends with D(x, t_min)
    for solver in (Adaptive(rtol=1e-3, atol=1e-3), Adaptive(rtol=1e-7, atol=1e-7, method="dopri5")):
        calls.clear()
        x, info = run(x_T, solver)
        x.block_until_ready()
        jax.effects_barrier()
        assert int(info["nfe"]) == len(calls)
        assert int(info["nfe"]) == 6 * (int(info["steps"]) + int(info["rejected_steps"])) + 1 + 1


def test_solve_ode_counts_rejected_first_steps(x64):
    """A stiff start rejects the first attempts; each costs the FSAL first stage again."""
    calls = []

    def f(s, y):
        jax.debug.callback(lambda: calls.append(1))
        return -2000.0 * (y - jnp.cos(s))

    _, info = jax.jit(lambda y: solve_ode(f, y, 0.0, 1.0, rtol=1e-8, atol=1e-8, max_steps=100_000))(jnp.zeros(3))
    jax.effects_barrier()
    assert int(info["rejected_steps"]) > 0
    assert int(info["nfe"]) == len(calls)
    assert int(info["nfe"]) > 6 * (int(info["steps"]) + int(info["rejected_steps"])) + 1  # first step was rejected


def test_adaptive_under_vmap(x64):
    gm = _mixture(jnp.float64)
    process = VE()
    den = gm.denoiser(process)
    x_T = process.prior_sample(jax.random.key(4), (3, 4, 2), jnp.float64)

    def one(x):
        return sample(den, process, x, solver="adaptive", steps=3, rtol=1e-6, atol=1e-6)

    xs, infos = jax.jit(jax.vmap(one))(x_T)
    assert infos["nfe"].shape == (3,)
    one = jax.jit(one)
    for i in range(3):
        x, info = one(x_T[i])
        np.testing.assert_allclose(xs[i], x, rtol=1e-9, atol=1e-9)
        assert int(infos["nfe"][i]) == int(info["nfe"])
