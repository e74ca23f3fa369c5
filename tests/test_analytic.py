"""Exact Gaussian-mixture quantities: densities, scores, denoisers, class posteriors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal

from difflax import EDM, VP, Flow
from difflax.analytic import GaussianMixture


def _random_full_mixture(rng, k=3, d=4, labels=(0, 1, 1)):
    a = rng.normal(size=(k, d, d))
    covs = a @ np.swapaxes(a, 1, 2) / d + 0.05 * np.eye(d)
    means = 2 * rng.normal(size=(k, d))
    weights = rng.uniform(0.2, 1.0, size=k)
    return GaussianMixture.full(means, covs, weights=weights, labels=labels), means, covs, weights / weights.sum()


def _scipy_log_prob(x, means, covs, weights, alpha, sigma):
    d = means.shape[1]
    dens = sum(
        w * multivariate_normal(alpha * m, alpha**2 * c + sigma**2 * np.eye(d)).pdf(x)
        for w, m, c in zip(weights, means, covs, strict=True)
    )
    return np.log(dens)


@pytest.mark.parametrize("alpha,sigma", [(1.0, 0.0), (0.8, 0.6), (0.05, 1.0), (1.0, 30.0)])
def test_log_prob_matches_scipy(alpha, sigma, x64):
    rng = np.random.default_rng(0)
    gm, means, covs, w = _random_full_mixture(rng)
    x = rng.normal(size=(7, 4)) * (1 + sigma)
    want = _scipy_log_prob(x, means, covs, w, alpha, sigma)
    np.testing.assert_allclose(gm.log_prob(x, alpha, sigma), want, rtol=1e-10)


def test_diagonal_and_isotropic_agree_with_full(x64):
    rng = np.random.default_rng(1)
    means = rng.normal(size=(2, 3))
    var = rng.uniform(0.1, 2.0, size=(2, 3))
    diag = GaussianMixture.diagonal(means, var)
    full = GaussianMixture.full(means, jax.vmap(jnp.diag)(jnp.asarray(var)))
    x = rng.normal(size=(5, 3))
    np.testing.assert_allclose(diag.log_prob(x, 0.7, 0.4), full.log_prob(x, 0.7, 0.4), rtol=1e-12)
    np.testing.assert_allclose(diag.posterior_mean(x, 0.7, 0.4), full.posterior_mean(x, 0.7, 0.4), rtol=1e-10)
    iso = GaussianMixture.isotropic(means, [0.5, 1.5])
    ref = GaussianMixture.diagonal(means, np.array([[0.25] * 3, [2.25] * 3]))
    np.testing.assert_allclose(iso.score(x, 0.3, 0.9), ref.score(x, 0.3, 0.9), rtol=1e-12)


def test_score_is_gradient_and_tweedie_holds(x64):
    rng = np.random.default_rng(2)
    gm, *_ = _random_full_mixture(rng)
    p = VP()
    x = jnp.asarray(rng.normal(size=(6, 4)))
    t = jnp.linspace(0.05, 0.95, 6)
    alpha, sigma = p.alpha_sigma(t)
    grad = jax.vmap(jax.grad(lambda xi, ti: gm.log_prob_fn(p)(xi[None], ti[None])[0]))(x, t)
    score = gm.score_fn(p)(x, t)
    np.testing.assert_allclose(score, grad, rtol=1e-9, atol=1e-12)
    tweedie = (alpha[:, None] * gm.denoiser(p)(x, t) - x) / sigma[:, None] ** 2
    np.testing.assert_allclose(score, tweedie, rtol=1e-8, atol=1e-10)


def test_denoiser_is_the_conditional_expectation(key, x64):
    """E[x0 | x_t] is the L2 projection: the residual x0 - D(x_t) is orthogonal to functions of x_t."""
    rng = np.random.default_rng(3)
    gm, *_ = _random_full_mixture(rng, d=2, labels=(0, 1, 2))
    p = VP()
    n = 100_000
    k0, k1 = jax.random.split(key)
    x0, _ = gm.sample(k0, n)
    t = 0.4
    x_t = p.marginal(x0, t, jax.random.normal(k1, x0.shape, x0.dtype))
    resid = x0 - gm.denoiser(p)(x_t, t)
    for h in (x_t, jnp.tanh(x_t), gm.denoiser(p)(x_t, t)):
        corr = jnp.mean(resid[:, :, None] * h[:, None, :], axis=0)
        se = jnp.std(resid[:, :, None] * h[:, None, :], axis=0) / np.sqrt(n)
        assert bool(jnp.all(jnp.abs(corr) < 5 * se)), (corr, se)


def test_class_posterior_and_conditional_denoisers(x64):
    rng = np.random.default_rng(4)
    gm, *_ = _random_full_mixture(rng, k=4, labels=(0, 1, 1, 2))
    p = EDM()
    x = jnp.asarray(rng.normal(size=(5, 4)))
    t = 0.7
    alpha, sigma = p.alpha_sigma(t)
    post = gm.class_posterior(x, alpha, sigma)
    np.testing.assert_allclose(post.sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(jnp.exp(gm.class_log_posterior(x, alpha, sigma)), post, rtol=1e-10)
    # Bayes: p(y | x) = p(x | y) p(y) / p(x), each term exact.
    prior_y = np.array([np.exp(gm.log_weights)[np.asarray(gm.labels) == y].sum() for y in range(3)])
    for y in range(3):
        log_ratio = gm.log_prob(x, alpha, sigma, y=y) + np.log(prior_y[y]) - gm.log_prob(x, alpha, sigma)
        np.testing.assert_allclose(post[:, y], np.exp(log_ratio), rtol=1e-9)
    # Total expectation: sum_y p(y | x) E[x0 | x, y] = E[x0 | x].
    mix = sum(post[:, y : y + 1] * gm.denoiser(p, y=y)(x, t) for y in range(3))
    np.testing.assert_allclose(mix, gm.denoiser(p)(x, t), rtol=1e-9)
    # Per-example labels.
    y = jnp.array([0, 1, 2, 1, 0])
    per_ex = gm.conditional_denoiser(p)(x, t, y)
    for i in range(5):
        np.testing.assert_allclose(per_ex[i], gm.denoiser(p, y=int(y[i]))(x[i : i + 1], t)[0], rtol=1e-12)


def test_one_dimensional_density_integrates_to_one(x64):
    gm = GaussianMixture.isotropic(jnp.array([[-3.0], [0.5], [4.0]]), jnp.array([0.2, 1.0, 0.05]), weights=[1, 2, 1])
    grid = jnp.linspace(-12, 12, 200_001)[:, None]
    for alpha, sigma in [(1.0, 0.0), (0.6, 0.8), (0.0, 1.0)]:
        dens = jnp.exp(gm.log_prob(grid, alpha, sigma))
        assert float(jnp.trapezoid(dens, grid[:, 0])) == pytest.approx(1.0, abs=1e-6)


def test_samples_and_noised_mixture(key, x64):
    rng = np.random.default_rng(5)
    gm, *_ = _random_full_mixture(rng, d=3, labels=(0, 1, 1))
    x, comp = gm.sample(key, 50_000)
    np.testing.assert_allclose(np.mean(np.asarray(x), 0), gm.mean(), atol=0.06)
    np.testing.assert_allclose(np.cov(np.asarray(x).T), gm.covariance(), atol=0.12)
    np.testing.assert_allclose(np.bincount(np.asarray(comp)) / 50_000, np.exp(gm.log_weights), atol=0.01)
    noised = gm.noised(0.6, 0.8)
    pts = jnp.asarray(rng.normal(size=(4, 3)))
    np.testing.assert_allclose(noised.log_prob(pts), gm.log_prob(pts, 0.6, 0.8), rtol=1e-12)
    _, comp_y = gm.sample(key, 1000, y=1)
    assert bool(jnp.all(gm.labels[comp_y] == 1))


def test_narrow_modes_are_finite_in_float32():
    """Sixteen dimensions, modes of width 1e-3 far apart: log-sum-exp keeps everything finite."""
    rng = np.random.default_rng(6)
    means = jnp.asarray(3 * rng.normal(size=(8, 16)), jnp.float32)
    gm = GaussianMixture.isotropic(means, 1e-3)
    p = Flow()
    denoise = jax.jit(gm.denoiser(p))
    x = 10 * jax.random.normal(jax.random.key(0), (32, 16))
    for t in [1e-3, 0.05, 0.5, 0.999]:
        out = denoise(x, jnp.float32(t))
        assert bool(jnp.all(jnp.isfinite(out)))
        assert bool(jnp.all(jnp.isfinite(gm.score_fn(p)(x, jnp.float32(t)))))
    # Close to the data the denoiser snaps to the nearest mode.
    x_t = p.marginal(means, 0.01, 0.01 * jax.random.normal(jax.random.key(1), means.shape))
    np.testing.assert_allclose(denoise(x_t, jnp.float32(0.01)), means, atol=1e-3)


def test_event_shape_and_errors():
    gm = GaussianMixture.isotropic(jnp.zeros((2, 12)), 1.0, event_shape=(2, 3, 2))
    x = jnp.ones((5, 2, 3, 2))
    assert gm.denoiser(VP())(x, jnp.full((5,), 0.3)).shape == x.shape
    with pytest.raises(ValueError, match="event shape"):
        gm.log_prob(jnp.ones((5, 12)))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture.isotropic(jnp.zeros((2, 2)), 1.0, weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="labels"):
        GaussianMixture.isotropic(jnp.zeros((2, 2)), 1.0).denoiser(VP(), y=0)(jnp.ones((1, 2)), 0.5)
    with pytest.raises(ValueError, match="positive semi-definite"):
        GaussianMixture.full(jnp.zeros((1, 2)), -jnp.eye(2)[None])


@pytest.mark.parametrize("weighting", ["simple", "edm"])
def test_exact_denoiser_minimizes_the_denoising_loss(weighting, key, x64):
    """The analytic denoiser has a lower denoising loss than every perturbation of it (common random numbers)."""
    from difflax import losses

    rng = np.random.default_rng(7)
    gm, *_ = _random_full_mixture(rng, d=2, labels=(0, 1, 2))
    p = EDM()
    n = 50_000
    k0, k1, k2 = jax.random.split(key, 3)
    x0, _ = gm.sample(k0, n)
    t = losses.sample_t_edm(k1, (n,), p)
    eps = jax.random.normal(k2, x0.shape, x0.dtype)
    exact = gm.denoiser(p)
    other = GaussianMixture.isotropic(gm.means, 1.0)  # wrong covariances
    perturbed = {
        "exact": exact,
        "scaled": lambda x, t: 1.05 * exact(x, t),
        "shifted": lambda x, t: exact(x, t) + 0.05,
        "later_time": lambda x, t: exact(x, 1.2 * t),
        "wrong_mixture": other.denoiser(p),
    }
    loss = {
        name: float(jnp.mean(losses.denoising_loss(f, p, x0, t, eps, prediction="x0", weighting=weighting)))
        for name, f in perturbed.items()
    }
    assert all(loss["exact"] < v for k, v in loss.items() if k != "exact"), loss
