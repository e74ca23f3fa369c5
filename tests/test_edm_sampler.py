"""The stochastic EDM sampler against a NumPy transcription of Algorithm 2 of Karras et al. 2022."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import difflax
from difflax.analytic import GaussianMixture

GM = GaussianMixture.isotropic(jnp.array([[-2.0, 0.5], [1.5, -1.0], [0.0, 2.0]]), jnp.array([0.3, 0.5, 0.2]))
N = 8


def algorithm_2(denoise, sigmas, x, eps, s_churn, s_tmin, s_tmax, s_noise):
    """Algorithm 2 ("Elucidating the design space of diffusion-based generative models"), written from the
    paper: ``sigmas`` are ``t_0 > ... > t_N = 0``, ``eps[i]`` the standard normal draw of step ``i``."""
    n = len(sigmas) - 1
    for i in range(n):
        t, t_next = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / n, np.sqrt(2.0) - 1.0) if s_tmin <= t <= s_tmax else 0.0
        t_hat = t + gamma * t
        x_hat = x + np.sqrt(t_hat**2 - t**2) * s_noise * eps[i]
        d = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x = x_hat + (t_next - t_hat) * d
        if t_next != 0:
            d_next = (x - denoise(x, t_next)) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d_next)
    return x


@pytest.mark.parametrize(
    ("s_churn", "s_tmin", "s_tmax", "s_noise"),
    [(0.0, 0.0, np.inf, 1.0), (10.0, 0.0, np.inf, 1.0), (40.0, 0.05, 50.0, 1.003), (6.0, 0.5, 5.0, 0.9)],
)
def test_edm_is_algorithm_2(x64, s_churn, s_tmin, s_tmax, s_noise):
    process = difflax.EDM()
    denoise = GM.denoiser(process)
    x_T = process.prior_sample(jax.random.key(0), (16, 2)).astype(jnp.float64)
    key = jax.random.key(1)
    x, info = difflax.sample(denoise, process, x_T, solver="edm", steps=N, key=key, s_churn=s_churn,
                             s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    sigmas = np.asarray(info["ts"], np.float64)
    # The loop hands step i the key fold_in(key, i); the last step (to 0) is step N - 1.
    eps = [np.asarray(jax.random.normal(jax.random.fold_in(key, i), x_T.shape, jnp.float64)) for i in range(N)]
    d = lambda x, t: np.asarray(denoise(jnp.asarray(x), jnp.full((x.shape[0],), t)))
    want = algorithm_2(d, sigmas, np.asarray(x_T), eps, s_churn, s_tmin, s_tmax, s_noise)
    np.testing.assert_allclose(np.asarray(x), want, rtol=1e-12, atol=1e-12)
    assert int(info["nfe"]) == 2 * (N - 1) + 1


def test_edm_without_churn_is_heun_exactly_and_churn_final_is_an_option(x64):
    for process in (difflax.EDM(), difflax.VP(), difflax.DiscreteVP.cosine()):
        denoise = GM.denoiser(process)
        x_T = process.prior_sample(jax.random.key(0), (16, 2)).astype(jnp.float64)
        edm, _ = difflax.sample(denoise, process, x_T, solver="edm", steps=N, key=jax.random.key(1))
        heun, _ = difflax.sample(denoise, process, x_T, solver="heun", steps=N)
        np.testing.assert_array_equal(np.asarray(edm), np.asarray(heun))
    # churn_final=False skips the churn of the last level only: equal up to that last step.
    process = difflax.EDM()
    denoise = GM.denoiser(process)
    x_T = process.prior_sample(jax.random.key(0), (16, 2)).astype(jnp.float64)
    run = lambda solver: difflax.sample(denoise, process, x_T, solver=solver, steps=N, key=jax.random.key(1),
                                        return_trajectory=True)[1]["trajectory"]
    with_final = run(difflax.solvers.EDMStochastic(s_churn=10.0))
    without = run(difflax.solvers.EDMStochastic(s_churn=10.0, churn_final=False))
    np.testing.assert_array_equal(np.asarray(with_final[:-1]), np.asarray(without[:-1]))
    assert float(jnp.max(jnp.abs(with_final[-1] - without[-1]))) > 1e-4


def test_no_churn_is_heun_exactly_even_where_alpha_is_zero():
    # Flow's alpha(t_max = 1) = 0: without churn the step must not rescale x by alpha_hat / alpha = 0 / 0.
    process = difflax.Flow()
    denoise = GM.denoiser(process)
    x_T = process.prior_sample(jax.random.key(0), (8, 2))
    key = jax.random.key(1)
    x_edm, _ = difflax.sample(denoise, process, x_T, solver="edm", steps=6, grid="uniform", key=key)
    x_heun, _ = difflax.sample(denoise, process, x_T, solver="heun", steps=6, grid="uniform")
    assert bool(jnp.all(jnp.isfinite(x_edm)))
    np.testing.assert_array_equal(x_edm, x_heun)
