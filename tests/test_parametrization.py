"""Parametrization conversions, EDM preconditioning and as_denoiser."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from difflax import EDM, VE, VP, DiscreteVP, Flow, SubVP, as_denoiser, convert, denoiser_to
from difflax.analytic import GaussianMixture
from difflax.parametrization import PREDICTIONS, edm_preconditioning, preconditioning
from difflax.processes import broadcast_to

PROCESSES = [VP, SubVP, VE, EDM, Flow, DiscreteVP.cosine]


def _targets(x0, eps, alpha, sigma, d_alpha, d_sigma):
    """Every prediction target written out from its definition."""
    norm = np.sqrt(alpha**2 + sigma**2)
    return {
        "eps": eps,
        "x0": x0,
        "v": (alpha * eps - sigma * x0) / norm,
        "score": -eps / sigma,
        "velocity": d_alpha * x0 + d_sigma * eps,
    }


@pytest.mark.parametrize("make", PROCESSES)
@given(u=st.floats(0.02, 0.98), seed=st.integers(0, 2**16))
def test_every_pair_converts_exactly(make, u, seed):
    with jax.enable_x64(True):
        p = make()
        t = jnp.float64(float(p.t_min) + u * (float(p.t_max) - float(p.t_min)))
        rng = np.random.default_rng(seed)
        x0, eps = rng.normal(size=(2, 5))
        alpha, sigma = (float(c) for c in p.alpha_sigma(t))
        d_alpha, d_sigma = (float(c) for c in p.alpha_sigma_derivatives(t))
        x_t = alpha * x0 + sigma * eps
        targets = _targets(x0, eps, alpha, sigma, d_alpha, d_sigma)
        for src, dst in itertools.product(PREDICTIONS, PREDICTIONS):
            got = convert(targets[src], src, dst, x_t, alpha, sigma, d_alpha, d_sigma)
            scale = np.max(np.abs(targets[dst])) + 1.0
            np.testing.assert_allclose(got, targets[dst], atol=1e-9 * scale, err_msg=f"{src}->{dst}")
            back = convert(got, dst, src, x_t, alpha, sigma, d_alpha, d_sigma)
            np.testing.assert_allclose(back, targets[src], atol=1e-9 * (np.max(np.abs(targets[src])) + 1))


def test_conversions_at_pure_noise_flow_end(x64):
    """At t = 1 of the flow interpolant alpha = 0; eps, v and velocity stay exact."""
    p = Flow()
    x0, eps = np.array([0.3, -1.2]), np.array([1.1, 0.4])
    alpha, sigma = 0.0, 1.0
    d_alpha, d_sigma = (float(c) for c in p.alpha_sigma_derivatives(jnp.float64(1.0)))
    x_t = eps
    targets = _targets(x0, eps, alpha, sigma, d_alpha, d_sigma)
    for src, dst in itertools.product(["v", "velocity"], ["x0", "eps", "v", "velocity"]):
        got = convert(targets[src], src, dst, x_t, alpha, sigma, d_alpha, d_sigma)
        np.testing.assert_allclose(got, targets[dst], atol=1e-12, err_msg=f"{src}->{dst}")


def test_edm_preconditioning_table_1():
    sd = 0.5
    for sigma in [0.002, 0.1, 1.0, 80.0]:
        c_skip, c_out, c_in, c_noise = (float(c) for c in edm_preconditioning(sigma, sd))
        assert c_skip == pytest.approx(sd**2 / (sigma**2 + sd**2), rel=1e-6)
        assert c_out == pytest.approx(sigma * sd / (sigma**2 + sd**2) ** 0.5, rel=1e-6)
        assert c_in == pytest.approx(1 / (sd**2 + sigma**2) ** 0.5, rel=1e-6)
        assert c_noise == pytest.approx(0.25 * np.log(sigma), rel=1e-6, abs=1e-7)
        # The design principles behind the column (EDM appendix B.6): unit-variance network
        # input, unit-variance effective training target.
        assert c_in**2 * (sigma**2 + sd**2) == pytest.approx(1, rel=1e-5)
        target_var = ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * sigma**2) / c_out**2
        assert target_var == pytest.approx(1, rel=1e-5)


def test_vp_and_ve_preconditioning_table_1(x64):
    t = 0.37
    sigma = np.sqrt(np.exp(0.5 * 19.9 * t**2 + 0.1 * t) - 1)
    c_skip, c_out, c_in, c_noise = preconditioning("vp", sigma)
    assert float(c_skip) == 1 and float(c_out) == pytest.approx(-sigma)
    assert float(c_in) == pytest.approx(1 / np.sqrt(sigma**2 + 1))
    assert float(c_noise) == pytest.approx(999 * t, rel=1e-10)
    c_skip, c_out, c_in, c_noise = preconditioning("ve", 3.0)
    assert (float(c_skip), float(c_out), float(c_in)) == (1.0, 3.0, 1.0)
    assert float(c_noise) == pytest.approx(np.log(1.5))


@pytest.mark.parametrize("make", PROCESSES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_as_denoiser_recovers_exact_denoiser(make, prediction, x64):
    p = make()
    gm = GaussianMixture.isotropic(jnp.array([[-1.0, 0.5], [1.0, -0.5]]), jnp.array([0.3, 0.6]))
    exact = gm.denoiser(p)
    net = denoiser_to(exact, p, prediction)
    t = jnp.asarray(np.linspace(float(p.t_min), 0.9 * float(p.t_max), 4))
    x = jax.random.normal(jax.random.key(1), (4, 2), jnp.float64)
    np.testing.assert_allclose(as_denoiser(net, p, prediction)(x, t), exact(x, t), rtol=1e-9, atol=1e-9)


def test_eps_network_from_score_agrees_with_exact_denoiser(x64):
    """Independent path: eps = -sigma * score from the mixture's own score."""
    p = VP()
    gm = GaussianMixture.isotropic(jnp.array([[-2.0, 0.0], [2.0, 1.0]]), 0.5)
    eps_net = lambda x, t: -broadcast_to(p.sigma(t), x) * gm.score_fn(p)(x, t)
    x = jax.random.normal(jax.random.key(2), (6, 2), jnp.float64)
    t = jnp.linspace(0.01, 0.9, 6)
    np.testing.assert_allclose(as_denoiser(eps_net, p, "eps")(x, t), gm.denoiser(p)(x, t), rtol=1e-9, atol=1e-10)


def test_as_denoiser_edm_formula(x64):
    p = VP()
    t = jnp.array([0.3, 0.8])
    x = jnp.arange(6.0).reshape(2, 3)
    raw = lambda x_in, c_noise: jnp.sin(x_in) + broadcast_to(c_noise, x_in)
    got = as_denoiser(raw, p, "edm", sigma_data=0.5)(x, t)
    alpha, sigma = (np.asarray(c)[:, None] for c in p.alpha_sigma(t))
    s = sigma / alpha
    c_skip, c_out, c_in = 0.25 / (s**2 + 0.25), 0.5 * s / np.sqrt(s**2 + 0.25), 1 / np.sqrt(s**2 + 0.25)
    want = c_skip * (x / alpha) + c_out * (np.sin(c_in * x / alpha) + np.log(s) / 4)
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"prediction 'noise'.*'eps'"):
        as_denoiser(lambda x, t: x, VP(), "noise")
    with pytest.raises(ValueError, match="source"):
        convert(1.0, "foo", "x0", 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="d_alpha and d_sigma"):
        convert(1.0, "velocity", "x0", 1.0, 0.5, 0.5)
    with pytest.raises(ValueError, match="preconditioning"):
        preconditioning("iddpm", 1.0)
    bad = as_denoiser(lambda x, t: x[:, :1], VP(), "eps")
    with pytest.raises(ValueError, match="apply_fn must return"):
        bad(jnp.ones((2, 3)), 0.5)
