"""Tests of difflax.losses against closed forms written out independently here."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from difflax import losses
from difflax.processes import EDM, VE, VP, DiscreteVP, Flow, SubVP

PREDS = ("eps", "x0", "v", "score", "velocity")
WEIGHTED = ("elbo", "snr", "min_snr", "edm", "snr+1")

# Process factories (built inside tests, after the x64 fixture, so tables get float64).
PROCESSES = {
    "vp": VP,
    "subvp": SubVP,
    "ve": VE,
    "edm": EDM,
    "flow": Flow,
    "ddpm": lambda: DiscreteVP.linear(1000),
}
# Fractions of [t_min, t_max]; the last one puts Flow at t = 0.999. Off the DiscreteVP knots.
FRACS = np.array([0.0137, 0.3113, 0.7719, 0.999])


def _times(process, fracs=FRACS):
    return jnp.asarray(process.t_min + fracs * (process.t_max - process.t_min))


def _data(key, batch, dim=5):
    k1, k2, k3 = jax.random.split(key, 3)
    x0 = jax.random.normal(k1, (batch, dim))
    eps = jax.random.normal(k2, (batch, dim))
    delta = jax.random.normal(k3, (batch, dim))
    return x0, eps, delta


def _col(c):
    return jnp.asarray(c)[:, None]


def _fd(f, t, h=1e-6):
    return (f(t + h) - f(t - h)) / (2 * h)


def _target(prediction, process, x0, eps, t):
    """Prediction targets from their definitions (finite-difference derivatives for velocity)."""
    a, s = _col(process.alpha(t)), _col(process.sigma(t))
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return (a * eps - s * x0) / jnp.sqrt(a**2 + s**2)
    if prediction == "score":
        return -eps / s
    return _col(_fd(process.alpha, t)) * x0 + _col(_fd(process.sigma, t)) * eps


def _w_eps(weighting, process, t, gamma=5.0, sigma_data=0.5):
    """Each weighting on the eps-MSE, from the papers' definitions."""
    a, s = process.alpha(t), process.sigma(t)
    snr = a**2 / s**2
    if weighting == "snr":
        return jnp.ones_like(t)
    if weighting == "min_snr":
        return jnp.minimum(snr, gamma) / snr
    if weighting == "edm":
        sig = s / a
        return (sig**2 + sigma_data**2) / (sig * sigma_data) ** 2 / snr
    if weighting == "snr+1":
        return (snr + 1) / snr
    _, g = process.sde_coefficients(t)
    return 0.5 * g**2 / s**2


def _delta_net(prediction, process, x0, eps, delta, t):
    """A network whose implied eps error is exactly ``delta`` at the true x_t."""
    a, s = _col(process.alpha(t)), _col(process.sigma(t))
    eps_hat = eps + delta
    x0_hat = x0 - s / a * delta
    out = _target(prediction, process, x0_hat, eps_hat, t)
    return lambda x_t, tt: out


# ----------------------------------------------------------------------------------------------
# Continuous-time losses.


@pytest.mark.parametrize("name", list(PROCESSES))
@pytest.mark.parametrize("prediction", PREDS)
def test_perfect_network_has_zero_loss(x64, key, name, prediction):
    process = PROCESSES[name]()
    t = _times(process)
    x0, eps, _ = _data(key, t.shape[0])
    out = _target(prediction, process, x0, eps, t)
    for weighting in ("simple", "edm"):
        loss = losses.denoising_loss(
            lambda x_t, tt: out, process, x0, t, eps, prediction=prediction, weighting=weighting
        )
        assert loss.shape == (4,)
        np.testing.assert_array_less(np.abs(np.asarray(loss)), 1e-9)
    # A wrong network is penalised.
    bad = losses.denoising_loss(lambda x_t, tt: out + 0.1, process, x0, t, eps, prediction=prediction)
    np.testing.assert_allclose(bad, 0.01, rtol=1e-6)


@pytest.mark.parametrize("name", list(PROCESSES))
@pytest.mark.parametrize("weighting", WEIGHTED)
def test_weightings_are_parametrization_invariant(x64, key, name, weighting):
    process = PROCESSES[name]()
    t = _times(process)
    x0, eps, delta = _data(key, t.shape[0])
    sd = getattr(process, "sigma_data", 0.5)
    expected = _w_eps(weighting, process, t, sigma_data=sd) * jnp.mean(delta**2, axis=1)
    for prediction in PREDS:
        net = _delta_net(prediction, process, x0, eps, delta, t)
        loss = losses.denoising_loss(net, process, x0, t, eps, prediction=prediction, weighting=weighting)
        np.testing.assert_allclose(loss, expected, rtol=1e-6, err_msg=prediction)
        w = losses.loss_weight(process, t, prediction=prediction, weighting=weighting)
        assert w.shape == t.shape and bool(jnp.all(jnp.isfinite(w)))


@given(
    name=st.sampled_from(["vp", "subvp", "ve", "edm", "flow"]),
    weighting=st.sampled_from(WEIGHTED),
    fracs=st.lists(st.floats(1e-3, 1 - 1e-6), min_size=4, max_size=4),
    gamma=st.floats(0.5, 20.0),
    sigma_data=st.floats(0.1, 2.0),
)
def test_weightings_invariant_random(name, weighting, fracs, gamma, sigma_data):
    with jax.enable_x64(True):
        process = PROCESSES[name]()
        t = _times(process, np.asarray(fracs))
        x0, eps, delta = _data(jax.random.key(len(name)), 4)
        expected = _w_eps(weighting, process, t, gamma, sigma_data) * jnp.mean(delta**2, axis=1)
        for prediction in PREDS:
            net = _delta_net(prediction, process, x0, eps, delta, t)
            loss = losses.denoising_loss(
                net, process, x0, t, eps, prediction=prediction, weighting=weighting, gamma=gamma, sigma_data=sigma_data
            )
            np.testing.assert_allclose(loss, expected, rtol=1e-6, err_msg=prediction)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_elbo_weight_is_half_g2_over_sigma2(x64, key, name):
    process = PROCESSES[name]()
    t = _times(process)
    f, g = process.sde_coefficients(t)
    x0, eps, _ = _data(key, t.shape[0], dim=3)
    loss = losses.denoising_loss(lambda x_t, tt: eps + 1.0, process, x0, t, eps, weighting="elbo")
    np.testing.assert_allclose(loss, 0.5 * g**2 / process.sigma(t) ** 2, rtol=1e-7)
    total = losses.denoising_loss(lambda x_t, tt: eps + 1.0, process, x0, t, eps, weighting="elbo", reduction="sum")
    np.testing.assert_allclose(total, 3 * loss, rtol=1e-12)
    # The same weight, written through f: g^2 = d sigma^2/dt - 2 f sigma^2.
    s2 = lambda tt: process.sigma(tt) ** 2
    np.testing.assert_allclose(loss, 0.5 * (_fd(s2, t) - 2 * f * s2(t)) / s2(t), rtol=1e-5)


def test_edm_weight_matches_karras(x64, key):
    """EDM's lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 on the x0-MSE (Karras et al. 2022, table 1)."""
    sigma = jnp.array([0.003, 0.2, 1.5, 60.0])
    x0, eps, delta = _data(key, 4)
    for process, sd, kw in [(EDM(sigma_data=0.7), 0.7, {}), (EDM(), 1.3, {"sigma_data": 1.3})]:
        loss = losses.denoising_loss(
            lambda x_t, t: x0 + delta, process, x0, sigma, eps, prediction="x0", weighting="edm", **kw
        )
        lam = (sigma**2 + sd**2) / (sigma * sd) ** 2
        np.testing.assert_allclose(loss, lam * jnp.mean(delta**2, 1), rtol=1e-10)
    # On a VP process the EDM noise level is sigma / alpha.
    vp = VP()
    t = _times(vp)
    s = vp.sigma(t) / vp.alpha(t)
    loss = losses.denoising_loss(lambda x_t, tt: x0 + delta, vp, x0, t, eps, prediction="x0", weighting="edm")
    np.testing.assert_allclose(loss, (s**2 + 0.25) / (s * 0.5) ** 2 * jnp.mean(delta**2, 1), rtol=1e-10)


@pytest.mark.parametrize("gamma", [5.0, 1.5])
def test_min_snr_matches_hang(x64, key, gamma):
    """Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) on x0, /SNR on eps, /(SNR + 1) on v (VP)."""
    vp = VP()
    t = _times(vp, np.array([0.002, 0.05, 0.3, 0.9]))
    snr = vp.alpha(t) ** 2 / vp.sigma(t) ** 2
    x0, eps, delta = _data(key, 4)
    msd = jnp.mean(delta**2, 1)
    v = vp.alpha(t)[:, None] * eps - vp.sigma(t)[:, None] * x0
    cases = {"x0": (x0 + delta, 1.0), "eps": (eps + delta, snr), "v": (v + delta, snr + 1.0)}
    for prediction, (out, denom) in cases.items():
        loss = losses.denoising_loss(
            lambda x_t, tt: out, vp, x0, t, eps, prediction=prediction, weighting="min_snr", gamma=gamma
        )
        np.testing.assert_allclose(loss, jnp.minimum(snr, gamma) / denom * msd, rtol=1e-9, err_msg=prediction)
    assert float(jnp.min(snr)) < gamma < float(jnp.max(snr))  # both sides of the clip are exercised


def test_flow_weights_finite_at_t_one(x64, key):
    """At alpha = 0 the weights are finite in every space where the objective is, and continuous there."""
    flow = Flow()
    x0, eps, delta = _data(key, 4)
    t_end = jnp.ones(4)
    t_near = jnp.full(4, 1.0 - 1e-9)
    net = lambda x_t, t: delta
    for weighting in ("simple", *WEIGHTED):
        for prediction in PREDS:
            at = losses.denoising_loss(net, flow, x0, t_end, eps, prediction=prediction, weighting=weighting)
            near = losses.denoising_loss(net, flow, x0, t_near, eps, prediction=prediction, weighting=weighting)
            infinite = prediction in ("eps", "score") and weighting in ("elbo", "edm", "snr+1")
            if infinite:
                assert bool(jnp.all(jnp.isposinf(at))), (weighting, prediction)
            else:
                assert bool(jnp.all(jnp.isfinite(at))), (weighting, prediction)
                np.testing.assert_allclose(at, near, rtol=1e-6, atol=1e-6, err_msg=f"{weighting} {prediction}")


def test_flow_matching_loss(x64, key):
    x0, eps, u = _data(key, 4)
    t = jax.random.uniform(jax.random.key(3), (4,)).at[0].set(1.0).at[1].set(0.0)
    net = lambda x_t, tt: u * (1.0 + tt[:, None]) + 0.1 * x_t
    loss = losses.flow_matching_loss(net, x0, t, eps)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    expected = jnp.mean((u * (1.0 + t[:, None]) + 0.1 * x_t - (eps - x0)) ** 2, axis=1)
    np.testing.assert_allclose(loss, expected, rtol=1e-12)
    total = losses.flow_matching_loss(net, x0, t, eps, reduction="sum")
    np.testing.assert_allclose(total, 5 * expected, rtol=1e-12)


def test_loss_is_jit_vmap_grad_safe(x64, key):
    x0, eps, _ = _data(key, 4)
    vp = VP()
    t = losses.sample_t_uniform(jax.random.key(1), (4,), vp)

    def loss_fn(w, process, t):
        net = lambda x_t, tt: w * x_t + jnp.sin(tt)[:, None]
        return jnp.mean(losses.denoising_loss(net, process, x0, t, eps, prediction="v", weighting="min_snr"))

    eager = loss_fn(0.3, vp, t)

    @jax.jit  # the process is passed as a pytree argument
    def all_transforms(w, process, t):
        ws = jnp.stack([w - 0.2, w, w + 0.2])
        batched = jax.vmap(loss_fn, (0, None, None))(ws, process, t)
        return loss_fn(w, process, t), jax.grad(loss_fn)(w, process, t), batched

    jitted, grad, batched = all_transforms(0.3, vp, t)
    np.testing.assert_allclose(jitted, eager, rtol=1e-10)
    np.testing.assert_allclose(batched[1], eager, rtol=1e-10)
    np.testing.assert_allclose(grad, (loss_fn(0.3 + 1e-6, vp, t) - loss_fn(0.3 - 1e-6, vp, t)) / 2e-6, rtol=1e-5)
    # Scalar t broadcasts over the batch.
    scalar = losses.denoising_loss(lambda x_t, tt: x_t, vp, x0, 0.5, eps)
    assert scalar.shape == (4,)


# ----------------------------------------------------------------------------------------------
# Samplers.


def test_sample_t_uniform(x64, key):
    for process in (VP(), EDM()):
        t = losses.sample_t_uniform(key, (20000,), process)
        assert t.shape == (20000,) and t.dtype == jnp.float64
        assert float(t.min()) >= process.t_min and float(t.max()) <= process.t_max
        width = process.t_max - process.t_min
        se = width / math.sqrt(12 * t.size)
        assert abs(float(t.mean()) - (process.t_min + process.t_max) / 2) < 5 * se
    assert losses.sample_t_uniform(key, 7, VP()).shape == (7,)


def test_sample_t_uniform_antithetic(x64, key):
    process = EDM()
    t = losses.sample_t_uniform(key, (8, 8), process, antithetic=True)
    assert t.shape == (8, 8)
    u = np.sort(np.asarray((t - process.t_min) / (process.t_max - process.t_min)).ravel())
    np.testing.assert_allclose(np.diff(u), 1 / 64, atol=1e-10)
    assert 0 <= u[0] < 1 / 64 and u[-1] < 1
    # Another key shifts the whole set.
    t2 = losses.sample_t_uniform(jax.random.key(5), (8, 8), process, antithetic=True)
    assert not np.allclose(np.sort(np.asarray(t2).ravel()), np.sort(np.asarray(t).ravel()))


def test_sample_t_logsnr_uniform(x64, key):
    for process in (VP(), DiscreteVP.cosine(200), EDM()):
        t = losses.sample_t_logsnr_uniform(key, (20000,), process)
        assert float(t.min()) >= process.t_min and float(t.max()) <= process.t_max
        lam = process.log_snr(t)
        lo, hi = float(process.log_snr(process.t_max)), float(process.log_snr(process.t_min))
        assert float(lam.min()) >= lo - 1e-6 and float(lam.max()) <= hi + 1e-6
        se = (hi - lo) / math.sqrt(12 * t.size)
        assert abs(float(lam.mean()) - (lo + hi) / 2) < 5 * se
        np.testing.assert_allclose(float(lam.var()), (hi - lo) ** 2 / 12, rtol=0.05)
    with pytest.raises(ValueError, match="log_snr_min"):
        losses.sample_t_logsnr_uniform(key, (4,), Flow())
    t = losses.sample_t_logsnr_uniform(key, (20000,), Flow(), log_snr_min=-6.0, log_snr_max=4.0)
    lam = Flow().log_snr(t)
    assert abs(float(lam.mean()) + 1.0) < 5 * 10 / math.sqrt(12 * t.size)
    with pytest.raises(ValueError, match="log_snr_max"):
        losses.sample_t_logsnr_uniform(key, (4,), VP(), log_snr_min=3.0, log_snr_max=-3.0)


def test_sample_t_edm(x64, key):
    n = 20000
    t = losses.sample_t_edm(key, (n,), EDM())
    log_s = jnp.log(t)
    assert abs(float(log_s.mean()) + 1.2) < 5 * 1.2 / math.sqrt(n)
    np.testing.assert_allclose(float(log_s.std()), 1.2, rtol=0.03)
    # On VP the log-normal is on sigma / alpha = exp(-log_snr / 2).
    t = losses.sample_t_edm(key, (n,), VP(), p_mean=-0.5, p_std=0.8)
    log_s = -0.5 * VP().log_snr(t)
    assert abs(float(log_s.mean()) + 0.5) < 5 * 0.8 / math.sqrt(n)
    np.testing.assert_allclose(float(log_s.std()), 0.8, rtol=0.03)


def test_sample_ddpm_steps(x64, key):
    process = DiscreteVP.linear(100)
    t, n = losses.sample_ddpm_steps(key, (20000,), process, return_steps=True)
    assert jnp.issubdtype(n.dtype, jnp.integer)
    assert int(n.min()) == 0 and int(n.max()) == 99
    np.testing.assert_allclose(t, (np.asarray(n) + 1) / 100, rtol=1e-12)
    steps = np.asarray(t) * 100 - 1
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-9)
    counts = np.bincount(np.asarray(n), minlength=100)
    assert counts.min() > 120 and counts.max() < 290  # 200 expected per step
    with pytest.raises(TypeError, match="DiscreteVP"):
        losses.sample_ddpm_steps(key, (4,), VP())


# ----------------------------------------------------------------------------------------------
# Discrete DDPM bound.


def _np_tables(process):
    betas = np.asarray(process.betas, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    beta_tilde = betas * (1 - abar_prev) / (1 - abar)
    return betas, abar, abar_prev, beta_tilde


def test_ddpm_posterior_is_bayes_rule(x64, key):
    process = DiscreteVP.cosine(50)
    betas, _, abar_prev, beta_tilde = _np_tables(process)
    n = jnp.array([0, 1, 7, 49])
    x0, x_t, _ = _data(key, 4, dim=3)
    mean, var, log_var = losses.ddpm_posterior(process, x0, x_t, n)
    nn = np.asarray(n)
    # q(x_{n-1} | x_n, x0) ∝ N(x_n; sqrt(1 - beta) x_{n-1}, beta) N(x_{n-1}; sqrt(abar_prev) x0, 1 - abar_prev)
    for i, k in enumerate(nn):
        if k == 0:  # abar_{-1} = 1: the posterior is the point mass at x0
            np.testing.assert_allclose(mean[i], x0[i], rtol=1e-12)
            assert float(var[i, 0]) == 0.0
            np.testing.assert_allclose(log_var[i, 0], np.log(beta_tilde[1]), rtol=1e-12)
            continue
        prec = (1 - betas[k]) / betas[k] + 1 / (1 - abar_prev[k])
        info = np.sqrt(1 - betas[k]) * np.asarray(x_t[i]) / betas[k]
        info = info + np.sqrt(abar_prev[k]) * np.asarray(x0[i]) / (1 - abar_prev[k])
        m = info / prec
        np.testing.assert_allclose(mean[i], m, rtol=1e-10)
        np.testing.assert_allclose(var[i, 0], 1 / prec, rtol=1e-10)
        np.testing.assert_allclose(log_var[i, 0], np.log(1 / prec), rtol=1e-10)


def test_ddpm_model_log_variance(x64):
    process = DiscreteVP.linear(100)
    betas, _, _, beta_tilde = _np_tables(process)
    n = jnp.array([0, 1, 50, 99])
    small = losses.ddpm_model_log_variance(process, n, kind="fixed_small")
    large = losses.ddpm_model_log_variance(process, n, kind="fixed_large")
    clipped = np.log(np.concatenate([[beta_tilde[1]], beta_tilde[1:]]))[np.asarray(n)]
    np.testing.assert_allclose(small, clipped, rtol=1e-10)
    np.testing.assert_allclose(large, np.log(np.concatenate([[beta_tilde[1]], betas[1:]]))[np.asarray(n)], rtol=1e-10)
    v = jnp.stack([jnp.full((4, 2), -1.0), jnp.full((4, 2), 1.0), jnp.zeros((4, 2))])
    log_beta = np.log(betas[np.asarray(n)])
    for vi, expect in zip(v, [clipped, log_beta, 0.5 * (clipped + log_beta)], strict=True):
        out = losses.ddpm_model_log_variance(process, n, vi, kind="learned_range")
        assert out.shape == (4, 2)
        np.testing.assert_allclose(out, np.broadcast_to(expect[:, None], (4, 2)), rtol=1e-10)
    with pytest.raises(ValueError, match="var_output"):
        losses.ddpm_model_log_variance(process, n, kind="learned_range")
    with pytest.raises(ValueError, match="kind"):
        losses.ddpm_model_log_variance(process, n, kind="fixed")
    with pytest.raises(TypeError, match="n must"):
        losses.ddpm_model_log_variance(process, jnp.array([1.0]))


def _gaussian_posterior_mean(x_t, m, s, a, sig):
    return m + a * s**2 / (a**2 * s**2 + sig**2) * (x_t - a * m)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_kl_terms_match_closed_form_for_gaussian_data(x64, key, schedule):
    """E[L_n] for x0 ~ N(m, s^2) and the exact E[x0 | x_n] model is coef_x0^2 Var[x0 | x_n] / (2 beta_tilde)."""
    process = getattr(DiscreteVP, schedule)(1000)
    betas, abar, abar_prev, beta_tilde = _np_tables(process)
    m, s, per_step, dim = 0.3, 0.5, 2000, 3
    steps = np.arange(1, 1000, 50)
    coef_x0 = betas * np.sqrt(abar_prev) / (1 - abar)
    post_var = s**2 * (1 - abar) / (abar * s**2 + (1 - abar))
    with np.errstate(divide="ignore"):  # beta_tilde_0 = 0; step 0 is the decoder, not a KL
        expected = coef_x0**2 * post_var / (2 * beta_tilde)

    n = jnp.repeat(jnp.asarray(steps), per_step)
    k1, k2 = jax.random.split(key)
    x0 = m + s * jax.random.normal(k1, (n.shape[0], dim))
    eps = jax.random.normal(k2, x0.shape)
    a, sig = jnp.sqrt(abar)[n][:, None], jnp.sqrt(1 - abar)[n][:, None]
    x_t = a * x0 + sig * eps
    x0_hat = _gaussian_posterior_mean(x_t, m, s, a, sig)
    log_var = losses.ddpm_model_log_variance(process, n, kind="fixed_small")
    terms_fn = jax.jit(losses.ddpm_vlb_terms)
    terms = np.asarray(terms_fn(process, x0, x_t, n, x0_hat, log_var)).reshape(len(steps), per_step)
    means, ses = terms.mean(1), terms.std(1) / math.sqrt(per_step)
    np.testing.assert_array_less(np.abs(means - expected[steps]), 5 * ses)
    assert abs(means.sum() - expected[steps].sum()) < 5 * math.sqrt((ses**2).sum())
    # The true x0 makes every KL term vanish.
    exact = terms_fn(process, x0, x_t, n, x0, log_var)
    np.testing.assert_allclose(exact, 0.0, atol=1e-12)


def test_ddpm_prior_kl(x64, key):
    process = DiscreteVP.linear(1000)
    abar_last = float(np.prod(1 - np.asarray(process.betas)))
    x0 = jax.random.uniform(key, (5, 2, 3), minval=-1, maxval=1)
    kl = losses.ddpm_prior_kl(process, x0)
    var = 1 - abar_last
    expected = 0.5 * np.mean(var + abar_last * np.asarray(x0) ** 2 - 1 - np.log(var), axis=(1, 2))
    np.testing.assert_allclose(kl, expected, rtol=1e-8)
    np.testing.assert_allclose(losses.ddpm_prior_kl(process, x0, bits=True), expected / math.log(2), rtol=1e-8)
    np.testing.assert_allclose(losses.ddpm_prior_kl(process, x0, reduction="sum"), 6 * expected, rtol=1e-8)


def test_ddpm_vlb_full_bound(x64, key):
    process = DiscreteVP.linear(8, beta_start=0.01, beta_end=0.3)
    betas, abar, abar_prev, beta_tilde = _np_tables(process)
    m, s, batch = -0.2, 0.4, 3000
    x0 = m + s * jax.random.normal(key, (batch, 3))

    def denoise_and_logvar(x_t, t):
        n = jnp.round(process.timestep(t)).astype(jnp.int32)
        a, sig = jnp.sqrt(jnp.asarray(abar))[n][:, None], jnp.sqrt(jnp.asarray(1 - abar))[n][:, None]
        return _gaussian_posterior_mean(x_t, m, s, a, sig), losses.ddpm_model_log_variance(process, n)

    fn = jax.jit(lambda x, k: losses.ddpm_vlb(denoise_and_logvar, process, x, k, return_terms=True))
    total, parts = fn(x0, jax.random.key(7))
    assert total.shape == (batch,) and parts["terms"].shape == (8, batch)
    np.testing.assert_allclose(total, parts["prior"] + parts["terms"].sum(0), rtol=1e-12)
    assert bool(jnp.all(jnp.isfinite(total)))
    coef_x0 = betas * np.sqrt(abar_prev) / (1 - abar)
    with np.errstate(divide="ignore"):
        expected = coef_x0**2 * s**2 * (1 - abar) / (abar * s**2 + 1 - abar) / (2 * beta_tilde)
    terms = np.asarray(parts["terms"])
    se = terms[1:].std(1) / math.sqrt(batch)
    np.testing.assert_array_less(np.abs(terms[1:].mean(1) - expected[1:]), 5 * se)
    np.testing.assert_allclose(parts["prior"], losses.ddpm_prior_kl(process, x0), rtol=1e-12)


def test_normal_kl():
    np.testing.assert_allclose(losses.normal_kl(0.0, 0.0, 1.0, math.log(4.0)), math.log(2) + 2 / 8 - 0.5, rtol=1e-6)
    np.testing.assert_allclose(losses.normal_kl(0.3, -1.0, 0.3, -1.0), 0.0, atol=1e-7)


_BINS = np.linspace(-1.0, 1.0, 256)
_dgll = jax.jit(losses.discretized_gaussian_log_likelihood)


@pytest.mark.parametrize(
    "mean,log_scale",
    [(0.1, math.log(0.3)), (0.001, -20.0), (-0.99, -6.0), (1.5, 0.0), (-5.0, 2.0), (0.2, 8.0), (0.7, -60.0)],
)
def test_discretized_gaussian_probabilities_sum_to_one(x64, mean, log_scale):
    logp = _dgll(jnp.asarray(_BINS), mean, log_scale)
    assert bool(jnp.all(jnp.isfinite(logp)))
    np.testing.assert_allclose(float(jnp.exp(logp).sum()), 1.0, atol=1e-5)


def test_discretized_gaussian_matches_density(x64):
    mean, scale = 0.1, 0.3
    logp = _dgll(jnp.asarray(_BINS), mean, math.log(scale))
    dens = stats.norm.pdf(_BINS, mean, scale) * (2 / 255)
    np.testing.assert_allclose(np.exp(logp)[1:-1], dens[1:-1], rtol=1e-3)
    np.testing.assert_allclose(np.exp(logp)[0], stats.norm.cdf(-1 + 1 / 255, mean, scale), rtol=1e-10)
    np.testing.assert_allclose(np.exp(logp)[-1], stats.norm.sf(1 - 1 / 255, mean, scale), rtol=1e-8)


def test_discretized_gaussian_tails_in_float32():
    """Bins in the far upper and lower tail keep their accuracy in float32 (no 1 - 1 cancellation)."""
    x = jnp.asarray(_BINS, jnp.float32)
    mean, scale = 0.0, 0.1
    logp = np.asarray(_dgll(x, mean, math.log(scale)))
    h = 1 / 255
    with np.errstate(divide="ignore"):
        ref = np.log(stats.norm.sf((_BINS - h - mean) / scale) - stats.norm.sf((_BINS + h - mean) / scale))
    ref[0], ref[-1] = stats.norm.logcdf((-1 + h) / scale), stats.norm.logsf((1 - h) / scale)
    ok = ref > math.log(1e-12)
    assert ok.sum() > 150 and (~ok).sum() > 20
    np.testing.assert_allclose(logp[ok], ref[ok], rtol=2e-4, atol=1e-4)
    np.testing.assert_allclose(logp[~ok], math.log(1e-12), rtol=1e-6)  # iDDPM's clamp
    grads = jax.jit(jax.grad(lambda mu, ls: _dgll(x, mu, ls).sum(), argnums=(0, 1)))(0.3, -8.0)
    assert all(bool(jnp.isfinite(g)) for g in grads)


def _hybrid_setup(key, batch=16):
    process = DiscreteVP.linear(1000)
    k1, k2, k3 = jax.random.split(key, 3)
    x0 = jnp.round(jax.random.uniform(k1, (batch, 2, 3), minval=-1, maxval=1) * 127.5) / 127.5
    eps = jax.random.normal(k2, x0.shape)
    n = jax.random.randint(k3, (batch,), 0, 1000).at[0].set(0)

    def apply_fn(params, x_t, t):
        eps_hat = params["a"] * x_t + params["b"] * t[:, None, None]
        v = jnp.tanh(params["c"] + 0.1 * x_t)
        return jnp.concatenate([eps_hat, v], axis=-1)

    params = {"a": jnp.array(0.6), "b": jnp.array(0.1), "c": jnp.array(0.2)}
    return process, x0, eps, n, apply_fn, params


def test_hybrid_loss_value(x64, key):
    process, x0, eps, n, apply_fn, params = _hybrid_setup(key)
    hybrid = jax.jit(lambda p: losses.hybrid_loss(partial_apply(apply_fn, p), process, x0, n, eps, return_terms=True))
    loss, terms = hybrid(params)
    abar = np.cumprod(1 - np.asarray(process.betas))
    a, s = jnp.sqrt(abar)[n][:, None, None], jnp.sqrt(1 - abar)[n][:, None, None]
    x_t = a * x0 + s * eps
    out = apply_fn(params, x_t, (n + 1.0) / 1000)
    eps_hat, v = out[..., :3], out[..., 3:]
    np.testing.assert_allclose(terms["mse"], jnp.mean((eps_hat - eps) ** 2, axis=(1, 2)), rtol=1e-12)
    x0_hat = (x_t - s * eps_hat) / a
    log_var = losses.ddpm_model_log_variance(process, n, v, kind="learned_range")
    vlb_nats = jax.jit(losses.ddpm_vlb_terms)(process, x0, x_t, n, x0_hat, log_var)
    np.testing.assert_allclose(terms["vlb"], vlb_nats / math.log(2), rtol=1e-9)  # bits by default
    np.testing.assert_allclose(loss, terms["mse"] + terms["vlb"], rtol=1e-12)  # lambda N = 1e-3 * 1000
    assert bool(jnp.all(jnp.isfinite(loss)))


def partial_apply(apply_fn, params):
    return lambda x_t, t: apply_fn(params, x_t, t)


def test_hybrid_loss_gradients(x64, key):
    process, x0, eps, n, apply_fn, params = _hybrid_setup(key)

    def total(p, lam):
        return jnp.mean(losses.hybrid_loss(partial_apply(apply_fn, p), process, x0, n, eps, lambda_vlb=lam))

    def vlb_only(p):
        _, terms = losses.hybrid_loss(partial_apply(apply_fn, p), process, x0, n, eps, return_terms=True)
        return jnp.mean(terms["vlb"])

    grads = jax.jit(lambda p: (jax.grad(total)(p, 1e-3), jax.grad(total)(p, 0.0), jax.grad(vlb_only)(p)))
    g_hybrid, g_mse, g_vlb = grads(params)
    # The bound sees the mean only through a stop-gradient: nothing flows to a and b ...
    assert float(g_vlb["a"]) == 0.0 and float(g_vlb["b"]) == 0.0
    np.testing.assert_allclose(g_hybrid["a"], g_mse["a"], rtol=1e-12)
    np.testing.assert_allclose(g_hybrid["b"], g_mse["b"], rtol=1e-12)
    # ... and all of the variance gradient comes from it.
    assert float(g_mse["c"]) == 0.0 and abs(float(g_vlb["c"])) > 1e-6
    np.testing.assert_allclose(g_hybrid["c"], 1e-3 * 1000 * g_vlb["c"], rtol=1e-10)


# ----------------------------------------------------------------------------------------------
# Bad input.


def test_bad_arguments_raise(x64, key):
    x0, eps, _ = _data(key, 4)
    net = lambda x_t, t: x_t
    with pytest.raises(ValueError, match=r"weighting 'bogus'.*'min_snr'"):
        losses.denoising_loss(net, VP(), x0, 0.5, eps, weighting="bogus")
    with pytest.raises(ValueError, match=r"prediction 'noise'.*'velocity'"):
        losses.denoising_loss(net, VP(), x0, 0.5, eps, prediction="noise")
    with pytest.raises(ValueError, match="reduction"):
        losses.denoising_loss(net, VP(), x0, 0.5, eps, reduction="max")
    with pytest.raises(ValueError, match="apply_fn"):
        losses.denoising_loss(lambda x_t, t: x_t[:, :2], VP(), x0, 0.5, eps)
    with pytest.raises(TypeError, match="DiscreteVP"):
        losses.sample_ddpm_steps(key, (2,), VP())
    with pytest.raises(TypeError, match="DiscreteVP"):
        losses.hybrid_loss(net, VP(), x0, jnp.array([1, 2, 3, 4]), eps)
    ddpm = DiscreteVP.linear(10)
    with pytest.raises(ValueError, match="var_kind"):
        losses.hybrid_loss(net, ddpm, x0, jnp.array([1, 2, 3, 4]), eps, var_kind="fixed_small")
    with pytest.raises(ValueError, match="apply_fn must return shape"):
        losses.hybrid_loss(net, ddpm, x0, jnp.array([1, 2, 3, 4]), eps)
    with pytest.raises(ValueError, match=r"n must lie in \[0, 9\]"):
        losses.ddpm_posterior(ddpm, x0, x0, jnp.array([3, 10, 0, 1]))
