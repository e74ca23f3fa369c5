"""Probability-flow ODE likelihoods against closed forms (x64).

With the exact denoiser of a Gaussian (mixture) the model's marginal at ``t_min`` is
known exactly, ``log p_{t_min}(x) = gm.log_prob(x, alpha(t_min), sigma(t_min))``, so the
ODE likelihood must reproduce it up to the solver tolerance and the prior mismatch at
``t_max``. The prior is exact for the flow interpolant (``alpha(1) = 0``); for VP/VE
the tests either pass the exact ``p_{t_max}`` as ``prior_logp`` or use centred data,
for which the default ``N(0, sigma_T^2)`` prior is off only at second order.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import difflax
from difflax import VE, VP, Flow, analytic
from difflax.likelihood import bits_per_dim, decode, dequantize, encode, log_likelihood

TOL_PER_DIM = 1e-3  # nats per dimension


def _gaussian(mean):
    cov = [[1.0, 0.3, 0.1], [0.3, 0.5, 0.0], [0.1, 0.0, 0.8]]
    return analytic.GaussianMixture.full(jnp.asarray([mean], jnp.float64), jnp.asarray([cov], jnp.float64))


def _mixture():
    means = jnp.asarray([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], jnp.float64)
    return analytic.GaussianMixture.isotropic(means, jnp.asarray([0.3, 0.5, 0.4]), weights=[0.5, 0.3, 0.2])


def _exact(gm, process, t):
    alpha, sigma = process.alpha_sigma(jnp.asarray(t, jnp.float64))
    return lambda x: gm.log_prob(x, alpha, sigma)


def _nll_error_per_dim(gm, process, exact_prior, num=32, key=0, **kwargs):
    x, _ = gm.sample(jax.random.key(key), num)
    prior = _exact(gm, process, process.t_max) if exact_prior else None
    run = jax.jit(lambda x: log_likelihood(gm.denoiser(process), process, x, prior_logp=prior, **kwargs))
    logp, info = run(x)
    ref = _exact(gm, process, process.t_min)(x)
    assert logp.shape == (num,) and bool(info["success"]) and int(info["nfe"]) > 0
    return float(jnp.max(jnp.abs(logp - ref))) / gm.dim, x, logp, info


@pytest.mark.parametrize(
    "process,mean,exact_prior",
    [(VP(), [0.0, 0.0, 0.0], False), (Flow(), [0.5, -1.0, 0.3], False)],
    ids=["vp_centred_default_prior", "flow_default_prior"],
)
def test_gaussian_nll_matches_closed_form(x64, process, mean, exact_prior):
    err, *_ = _nll_error_per_dim(_gaussian(mean), process, exact_prior)
    print(f"{type(process).__name__}: max |logp - exact| = {err:.2e} nats/dim")
    assert err < TOL_PER_DIM


@pytest.mark.parametrize("process,exact_prior", [(VE(), True), (Flow(), False)], ids=["ve_exact_prior", "flow"])
def test_mixture_nll_matches_log_prob(x64, process, exact_prior):
    err, *_ = _nll_error_per_dim(_mixture(), process, exact_prior)
    print(f"{type(process).__name__}: max |logp - exact| = {err:.2e} nats/dim")
    assert err < TOL_PER_DIM


def _far_points(gm):
    """36 points far from the data: 8 directions at Mahalanobis radius 4, 5 and 6 of the mixture's
    overall covariance, and 4 directions at 5 standard deviations from each mode."""
    mean, cov = np.asarray(gm.mean()), np.asarray(gm.covariance())
    angles = np.linspace(0.0, 2 * np.pi, 8, endpoint=False) + 0.3
    ring = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    chol = np.linalg.cholesky(cov)
    outer = [mean + r * ring @ chol.T for r in (4.0, 5.0, 6.0)]
    stds = np.sqrt(np.asarray(gm.eigvals)[:, 0])
    modes = [np.asarray(m) + 5.0 * s * ring[1::2] for m, s in zip(gm.means, stds, strict=True)]
    return jnp.asarray(np.concatenate(outer + modes))


@pytest.mark.parametrize("process,exact_prior", [(VE(), True), (Flow(), False)], ids=["ve_exact_prior", "flow"])
def test_mixture_nll_far_from_data(x64, process, exact_prior):
    """Points 4-6 standard deviations out, where log p reaches -330 nats, against the exact log-density.

    The error of a tolerance-controlled solve scales with ``tol (1 + |log p|)``: the state ``z`` is
    controlled to a relative ``tol``, and the prior term ``-|x_T|^2 / (2 sigma_T^2)`` turns a relative
    error ``delta`` of ``x_T`` into ``2 delta |log p_T|``. Measured ``max |error| / (tol (1 + |log p|))``
    over these points (VE, flow): 0.27, 0.32 at ``tol = 1e-8`` and 4.7, 3.5 at the default ``1e-5``,
    i.e. 3.6e-3 and 2.4e-3 nats/dim at the default tolerance (the error the audit found) and 3e-7,
    5e-7 at ``1e-8``; the bound is 10. The solves are deterministic (exact divergence, fixed points).
    """
    gm = _mixture()
    x = _far_points(gm)
    prior = _exact(gm, process, process.t_max) if exact_prior else None
    exact = _exact(gm, process, process.t_min)(x)
    assert float(jnp.max(exact)) < -6.0 and float(jnp.min(exact)) < -300.0  # the peak of log p is -0.1
    run = jax.jit(lambda x, tol: log_likelihood(gm.denoiser(process), process, x, prior_logp=prior, rtol=tol, atol=tol))
    errors = {}
    for tol in (1e-5, 1e-8):
        logp, info = run(x, tol)
        assert bool(info["success"])
        err = np.abs(np.asarray(logp - exact))
        errors[tol] = err.max() / gm.dim
        np.testing.assert_array_less(err, 10 * tol * (1 + np.abs(np.asarray(exact))))
    print(f"{type(process).__name__}: max |logp - exact| far out = {errors} nats/dim (tol: error)")
    assert errors[1e-8] < 1e-5 and errors[1e-8] < 0.01 * errors[1e-5]  # converges with the tolerance


def test_vp_gaussian_with_exact_prior_and_default_prior_error(x64):
    """Non-centred data on VP: exact up to the prior, which is off by ~alpha_T <x_T, mean> / sigma_T^2."""
    gm, process = _gaussian([0.5, -1.0, 0.3]), VP()
    err, x, logp, info = _nll_error_per_dim(gm, process, exact_prior=False)
    with_exact_prior = logp - info["prior_logp"] + _exact(gm, process, process.t_max)(info["x_T"])
    exact_err = float(jnp.max(jnp.abs(with_exact_prior - _exact(gm, process, process.t_min)(x)))) / gm.dim
    print(f"VP: {exact_err:.2e} nats/dim with the exact prior, {err:.2e} with N(0, 1)")
    assert exact_err < TOL_PER_DIM
    alpha_T = float(process.alpha(1.0))
    assert 1e-4 < err < 3 * alpha_T * float(jnp.abs(gm.mean()).sum()) / gm.dim + 1e-3


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(x64, noise):
    """Mean over independent probe draws (vmapped solves) matches the exact trace within Monte Carlo error."""
    gm, process = _mixture(), Flow()
    x, _ = gm.sample(jax.random.key(7), 12)
    den = gm.denoiser(process)
    exact, _ = jax.jit(lambda x: log_likelihood(den, process, x))(x)
    keys = jax.random.split(jax.random.key(8), 64)
    est = jax.jit(
        jax.vmap(lambda k: log_likelihood(den, process, x, key=k, divergence="hutchinson", probes=2, noise=noise)[0])
    )(keys)
    mean, se = est.mean(0), est.std(0, ddof=1) / math.sqrt(keys.shape[0])
    assert np.all(np.asarray(se) > 0)
    z = np.asarray((mean - exact) / se)
    print(noise, "z-scores", np.round(z, 2))
    assert np.all(np.abs(z) < 5.0)
    assert abs(z.mean()) < 4.0 / math.sqrt(z.size)


def test_encode_decode_round_trip(x64):
    gm, process = _mixture(), VP()
    x, _ = gm.sample(jax.random.key(9), 16)
    den = gm.denoiser(process)
    tol = {"rtol": 1e-8, "atol": 1e-8}
    x_T = jax.jit(lambda x: encode(den, process, x, **tol))(x)
    back = jax.jit(lambda z: decode(den, process, z, **tol))(x_T)
    np.testing.assert_allclose(back, x, atol=1e-6)
    # The latent looks like the prior and is what the likelihood solve reaches.
    assert abs(float(jnp.std(x_T)) - 1.0) < 0.3
    _, info = log_likelihood(den, process, x, **tol)
    np.testing.assert_allclose(info["x_T"], x_T, atol=1e-5)


def test_bits_per_dim_uniform_data_is_8_bits():
    d = 3 * 8 * 8
    logp_uniform = -d * math.log(2.0)  # density 2^-D on [-1, 1]^D
    assert float(bits_per_dim(logp_uniform, d)) == pytest.approx(8.0, abs=1e-12)
    # The offset is log2(num_bins / data_range): 7 bits for 256 levels on [-1, 1] (score_sde).
    assert float(bits_per_dim(0.0, d)) == pytest.approx(7.0)
    assert float(bits_per_dim(-d * math.log(1.0), d, num_bins=2, data_range=1.0)) == pytest.approx(1.0)


def test_dequantize_tiles_the_bins(key):
    levels = jnp.arange(256.0)
    x = jnp.tile(2 * levels / 255 - 1, (64, 1))
    y = dequantize(key, x)
    k = jnp.floor((y + 1) / 2 * 256)
    np.testing.assert_array_equal(k, jnp.broadcast_to(levels, y.shape))
    assert float(y.min()) >= -1.0 and float(y.max()) < 1.0
    # Uniform within each bin: mean offset 1/2 of a bin.
    offset = (y + 1) / 2 * 256 - k
    assert abs(float(offset.mean()) - 0.5) < 0.01


def test_errors_and_export(x64):
    gm, process = _mixture(), Flow()
    den, x = gm.denoiser(process), jnp.zeros((2, 2))
    with pytest.raises(ValueError, match="divergence"):
        log_likelihood(den, process, x, divergence="trace")
    with pytest.raises(ValueError, match="key"):
        log_likelihood(den, process, x, divergence="hutchinson")
    with pytest.raises(ValueError, match="noise"):
        log_likelihood(den, process, x, divergence="hutchinson", key=jax.random.key(0), noise="uniform")
    with pytest.raises(ValueError, match="method"):
        log_likelihood(den, process, x, method="euler")
    with pytest.raises(ValueError, match="batch"):
        log_likelihood(den, process, jnp.zeros(2))
    assert difflax.likelihood.log_likelihood is log_likelihood
