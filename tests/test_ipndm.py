"""iPNDM: exact where its formulas are exact, on Gaussian mixtures (orders: tests/test_solver_convergence.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import difflax
from difflax.analytic import GaussianMixture
from difflax.solvers import IPNDM, make_grid

GM = GaussianMixture.isotropic(jnp.array([[-2.0, 0.5], [1.5, -1.0], [0.0, 2.0]]), jnp.array([0.3, 0.5, 0.2]))


@pytest.mark.parametrize("order", [2, 3, 4])
def test_fixed_coefficients_are_the_variable_step_ones_on_a_grid_uniform_in_rho(x64, order):
    # For the EDM process rho = sigma / alpha = t, so the uniform grid is uniform in rho, where the
    # uniform-step Adams-Bashforth coefficients are exact: both forms give the same sampler.
    process = difflax.EDM()
    x_T = process.prior_sample(jax.random.key(0), (16, 2)).astype(jnp.float64)
    ts = make_grid("uniform", process, 12, final_zero=False)
    run = lambda solver: difflax.sample(GM.denoiser(process), process, x_T, solver=solver, grid=ts)[0]
    fixed, variable = run(IPNDM(order=order)), run(IPNDM(order=order, variable_step=True))
    np.testing.assert_allclose(np.asarray(fixed), np.asarray(variable), rtol=0, atol=1e-12)
    # ... and they are not the first-order sampler
    assert float(jnp.max(jnp.abs(fixed - run(IPNDM(order=1))))) > 1e-3


@pytest.mark.parametrize("variable_step", [False, True])
@pytest.mark.parametrize(
    "process", [difflax.VP(), difflax.EDM(), difflax.DiscreteVP.cosine()], ids=["vp", "edm", "ddpm"]
)
def test_point_mass_is_exact(x64, process, variable_step):
    # Along x_t = alpha_t m + sigma_t eps, eps = (x_T - alpha_T m) / sigma_T, the noise prediction is the
    # constant eps: every consistent Adams-Bashforth method is exact at any step count and on any grid.
    m = jnp.array([[0.7, -1.3]])
    point_mass = GaussianMixture.isotropic(m, jnp.array([0.0])).denoiser(process)
    x_T = process.prior_sample(jax.random.key(0), (8, 2)).astype(jnp.float64)
    x, info = difflax.sample(point_mass, process, x_T, solver=IPNDM(variable_step=variable_step), steps=7,
                             grid="karras", final_zero=False)
    alpha_T, sigma_T = process.alpha_sigma(jnp.asarray(process.t_max, jnp.float64))
    alpha, sigma = process.alpha_sigma(jnp.asarray(process.t_min, jnp.float64))
    eps = (x_T - alpha_T * m) / sigma_T
    np.testing.assert_allclose(np.asarray(x), np.asarray(alpha * m + sigma * eps), rtol=0, atol=1e-10)
    assert int(info["nfe"]) == 7


def test_ipndm_beats_dpmpp_3m_at_few_steps_and_rejects_bad_orders(x64):
    # The reason iPNDM is a standard few-step baseline: at 5-10 NFE on the EDM process and the
    # Karras grid it tracks the exact probability-flow ODE better than the third-order DPM-Solver++.
    process = difflax.EDM()
    x_T = process.prior_sample(jax.random.key(1), (256, 2)).astype(jnp.float64)
    exact, _ = difflax.sample(GM.denoiser(process), process, x_T, solver="heun", steps=400, grid="karras")
    err = lambda solver, steps: float(jnp.sqrt(jnp.mean((difflax.sample(
        GM.denoiser(process), process, x_T, solver=solver, steps=steps, grid="karras")[0] - exact) ** 2)))
    for steps in (6, 10):
        assert err(IPNDM(), steps) < err("dpmpp_3m", steps), steps
    with pytest.raises(ValueError, match="ipndm order"):
        IPNDM(order=5)
