"""ParaDiGMS (Picard iterations over a sliding window) reproduces the sequential samplers in few rounds.

Data: the 2-D three-component mixture of the solver tests with its exact denoiser, in
float64. For DDIM (eta 0) and Euler on the probability-flow ODE, 100 steps, the Picard
output must match :func:`difflax.sample` with the same solver and grid to
``max |x - x_seq| <= tol * max |x_seq|`` (the stated tolerance is relative to the noise
scale of each step; measured errors are 0.2-0.7 tol times the data scale) in at most 25
sequential rounds, and exactly (to rounding) with ``tol = 0``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from difflax import VP, Flow, analytic, sample
from difflax.solvers import picard_sample
from difflax.solvers.picard import step_coefficients

MEANS = [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]]
STDS = [0.3, 0.5, 0.4]
WEIGHTS = [0.5, 0.3, 0.2]
STEPS = 100


def _mixture(labels=None):
    dtype = jnp.result_type(float)
    means, stds = jnp.asarray(MEANS, dtype), jnp.asarray(STDS, dtype)
    return analytic.GaussianMixture.isotropic(means, stds, weights=WEIGHTS, labels=labels)


CASES = [("ddim", VP(), 100), ("ddim", VP(), 20), ("euler", VP(), 100), ("euler", Flow(), 100)]


@pytest.mark.parametrize("solver,process,window", CASES, ids=[f"{c[0]}-{type(c[1]).__name__}-w{c[2]}" for c in CASES])
def test_picard_matches_sequential_solver(x64, solver, process, window):
    gm = _mixture()
    den = gm.denoiser(process)
    calls = []

    def counted(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return den(x, t)

    x_T = process.prior_sample(jax.random.key(0), (32, 2), jnp.float64)
    ref, ref_info = jax.jit(lambda x: sample(den, process, x, solver=solver, steps=STEPS))(x_T)
    assert int(ref_info["nfe"]) == STEPS
    scale = float(jnp.abs(ref).max())
    run = jax.jit(lambda x, tol: picard_sample(counted, process, x, solver=solver, steps=STEPS, window=window, tol=tol))
    errors, rounds = [], []
    for tol in (1e-2, 1e-4, 0.0):
        calls.clear()
        x, info = run(x_T, tol)
        x.block_until_ready()
        jax.effects_barrier()
        err = float(jnp.abs(x - ref).max())
        errors.append(err)
        rounds.append(int(info["rounds"]))
        assert bool(info["converged"])
        assert int(info["rounds"]) == len(calls)  # one batched denoiser call per round
        assert int(info["padded_nfe"]) == window * int(info["rounds"])
        assert STEPS <= int(info["nfe"]) <= int(info["padded_nfe"])
        if tol > 0:
            assert err <= tol * scale, (tol, err, scale)
            assert int(info["rounds"]) <= 25, info["rounds"]
    print(solver, type(process).__name__, window, "errors", errors, "rounds", rounds)
    assert errors[2] <= 1e-10 * scale  # tol = 0: the sequential result, up to rounding
    assert rounds[0] <= rounds[1] <= rounds[2] <= STEPS


@pytest.mark.parametrize("solver,window", [("ddim", 50), ("ddim", 20), ("euler", 50)])
def test_picard_with_a_class_conditional_denoiser(x64, solver, window):
    """A denoiser closing over ``(batch,)`` labels (the exact conditional denoiser of a labelled mixture:
    class 0 is the first component, class 1 the other two) is evaluated at every window position with
    the batch's labels: the Picard output is the sequential sampler's (``tol = 0``: to rounding)."""
    process = VP()
    batch, steps = 16, 50
    y = jnp.arange(batch) % 2
    den = _mixture(labels=[0, 1, 1]).denoiser(process, y=y)
    x_T = process.prior_sample(jax.random.key(3), (batch, 2), jnp.float64)
    ref, _ = jax.jit(lambda x: sample(den, process, x, solver=solver, steps=steps))(x_T)
    run = jax.jit(lambda x, tol: picard_sample(den, process, x, solver=solver, steps=steps, window=window, tol=tol))
    scale = float(jnp.abs(ref).max())
    exact, info = run(x_T, 0.0)
    assert bool(info["converged"])
    assert float(jnp.abs(exact - ref).max()) <= 1e-10 * scale
    approx, info = run(x_T, 1e-3)
    assert bool(info["converged"]) and int(info["rounds"]) < steps
    assert float(jnp.abs(approx - ref).max()) <= 1e-3 * scale
    # the labels are honoured: class 0 samples sit on the first component, class 1 samples off it
    near_first = np.linalg.norm(np.asarray(exact) - np.asarray(MEANS[0]), axis=-1) < 1.5
    assert np.all(near_first == (np.asarray(y) == 0))


def test_picard_ddpm_is_the_ancestral_sampler(x64):
    """Stochastic steps whose noise is fixed per step: Picard rounds converge to the chain driven by
    that noise (``tol = 0``: exactly), in far fewer rounds than steps; its law is the ancestral sampler's."""
    process = VP()
    den = _mixture().denoiser(process)
    x_T = process.prior_sample(jax.random.key(1), (1000, 2), jnp.float64)
    run = jax.jit(lambda x, tol, key: picard_sample(den, process, x, solver="ddpm", steps=50, tol=tol, key=key))
    seq, seq_info = run(x_T, 0.0, jax.random.key(2))
    assert bool(seq_info["converged"]) and int(seq_info["rounds"]) <= 50
    par, info = run(x_T, 1e-3, jax.random.key(2))
    # the window is shared by the batch (the worst of 1000 chains decides): 24 rounds measured
    assert int(info["rounds"]) <= 30 and bool(info["converged"])
    assert float(jnp.abs(par - seq).max()) <= 1e-2  # 3e-3 measured
    other, _ = run(x_T, 1e-3, jax.random.key(3))
    assert float(jnp.abs(other - par).max()) > 0.1  # the key drives the noise
    # the chain's law is that of difflax.sample(solver="ddpm")
    x_other = process.prior_sample(jax.random.key(3), (1000, 2), jnp.float64)
    plain = jax.jit(lambda x, key: sample(den, process, x, solver="ddpm", steps=50, key=key))
    ref, _ = plain(x_other, jax.random.key(4))
    for d in ((1.0, 0.0), (0.0, 1.0)):
        assert scipy.stats.ks_2samp(np.asarray(seq) @ d, np.asarray(ref) @ d).pvalue > 0.005


def test_step_coefficients_are_the_sequential_steps(x64):
    """``a x + b D(x)`` reproduces one step of the DDIM, DDPM-mean and Euler solvers and the final step."""
    process = VP()
    ts = jnp.asarray([1.0, 0.6, 0.3, 1e-3, 0.0])
    x = jnp.asarray([[0.3, -1.2]])
    x0 = jnp.asarray([[1.0, 0.5]])

    @jax.jit
    def steps():
        alpha, sigma = process.alpha_sigma(ts[:4])
        d_alpha, d_sigma = process.alpha_sigma_derivatives(ts[0])
        eps = (x - alpha[0] * x0) / sigma[0]
        e_h = alpha[0] * sigma[1] / (alpha[1] * sigma[0])
        want = {
            "ddim": alpha[1] * x0 + sigma[1] * eps,
            "euler": x + (ts[1] - ts[0]) * (d_alpha * x0 + d_sigma * eps),
            "ddpm": alpha[1] * x0 + sigma[1] * e_h * eps,
        }
        got = {}
        for name in want:
            a, b, c, v = step_coefficients(name, process, ts, final_zero=True)
            got[name] = (a[0] * x + b[0] * x0, a, b, c, v)
        return want, got, sigma[1] ** 2 * (1 - e_h**2)

    want, got, var = steps()
    for name, (step, a, b, c, v) in got.items():
        np.testing.assert_allclose(step, want[name], rtol=1e-12)
        assert (float(a[-1]), float(b[-1]), float(c[-1]), float(v[-1])) == (0.0, 1.0, 0.0, 0.0)  # x_N = D(x, t_min)
        np.testing.assert_allclose(v[0], var, rtol=1e-12)  # the ancestral step's variance
        if name == "ddpm":
            np.testing.assert_allclose(c**2, v, rtol=1e-12)
        else:
            assert np.all(np.asarray(c) == 0.0)


def test_max_rounds_stops_early(x64):
    process = VP()
    den = _mixture().denoiser(process)
    x_T = process.prior_sample(jax.random.key(0), (8, 2), jnp.float64)
    x, info = picard_sample(den, process, x_T, steps=30, window=10, tol=1e-6, max_rounds=2)
    assert int(info["rounds"]) == 2 and not bool(info["converged"])
    assert x.shape == x_T.shape


def test_bad_arguments():
    process = VP()
    den = _mixture().denoiser(process)
    x = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match=r"Unknown solver 'heun'.*ddim, euler, ddpm"):
        picard_sample(den, process, x, solver="heun", steps=10)
    with pytest.raises(ValueError, match="window"):
        picard_sample(den, process, x, steps=10, window=0)
    with pytest.raises(ValueError, match="max_rounds"):
        picard_sample(den, process, x, steps=10, max_rounds=0)
    with pytest.raises(ValueError, match="key"):
        picard_sample(den, process, x, solver="ddpm", steps=10)
    with pytest.raises(ValueError, match="steps"):
        picard_sample(den, process, x, steps=0)
    with pytest.raises(ValueError, match="denoise must return"):
        picard_sample(lambda x, t: x[:, :1], process, x, steps=10)
