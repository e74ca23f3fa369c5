"""Stochastic samplers draw from the data distribution; the adaptive ODE solver is accurate.

Data: a 2-D mixture of three well-separated isotropic Gaussians with unequal weights
and widths, whose exact denoiser stands in for a perfectly trained network. For each
sampler we draw ``N`` samples and compare with the exact mixture

* mean and covariance: ``|estimate - exact| <= 4 standard errors + a stated
  discretization tolerance`` (mean: 0.02 absolute; covariance entry ``ij``:
  ``2% of sqrt(S_ii S_jj)``, i.e. the bias of 200 first-order steps),
* mixture weights, recovered by the most probable component of each sample under
  the exact component posterior: ``|fraction - w_k| <= 4 standard errors + 0.01``, and
* the covariance within each mode (the samples assigned to it), entry by entry and
  through its trace, against the variance the sampler gives that Gaussian component:
  ``4 standard errors + 2%``. Each sampler here is linear in ``x`` on one Gaussian
  component (its exact denoiser is affine there), so that variance follows a scalar
  recursion written out below from each paper's update rule (:func:`_mode_variance`);
  it carries the sampler's own bias (DDPM with ``beta~`` and 200 steps: -7 to -10%;
  annealed Langevin: +18%) and is exact for a single Gaussian. On the mixture it agrees
  with 200 000 samples to 1.6% (measured: the modes interact while the noise is large),
  hence the 2%. The overall covariance cannot see a wrong noise scale (the spread
  between the modes dominates it); the within-mode check does: scaling a sampler's
  noise by 0.9 or 1.1 changes the within-mode variance by -16 to -20% or +18 to +24%
  (measured for every sampler here).

Annealed Langevin dynamics is a much slower sampler: its unadjusted Langevin steps
shift the mode weights by ~1.5% at affordable step sizes (measured), so its tolerance
is 0.03 on the weights and 0.05 on the mean.
"""

import math
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


def _check_distribution(x, gm, mean_tol=0.02, cov_rel_tol=0.02, weight_tol=0.01, mode_cov=None, mode_rel_tol=0.02):
    """Mean, covariance, mode weights and within-mode covariances (``mode_cov``, default the exact components')."""
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

    # Within-mode covariances. The modes are about 3.5 or more standard deviations from the boundaries
    # of the assignment, which truncates each mode's variance by < 0.3% (measured on 10^6 exact draws).
    ref = np.asarray(gm.covariances() if mode_cov is None else mode_cov, np.float64)
    within = []
    for k in range(len(w)):
        d = x[comp == k] - x[comp == k].mean(0)
        prods = d[:, :, None] * d[:, None, :]
        c_k, se_k = prods.mean(0), prods.std(0) / np.sqrt(len(d))
        scale_k = np.sqrt(np.outer(np.diag(ref[k]), np.diag(ref[k])))
        assert np.all(np.abs(c_k - ref[k]) <= 4 * se_k + mode_rel_tol * scale_k), (k, c_k, ref[k], se_k)
        r2 = np.sum(d**2, axis=1)  # the trace pools the coordinates: the sharper test of a noise scale
        tr = np.trace(ref[k])
        assert abs(r2.mean() - tr) <= 4 * r2.std() / np.sqrt(len(d)) + mode_rel_tol * tr, (k, r2.mean(), tr)
        within.append(c_k)
    return m, c, frac, within


def _chi_mean(d):
    """``E |z|`` for ``z ~ N(0, I_d)``."""
    return math.sqrt(2.0) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))


@jax.jit
def _score_norms(gm, process, ts, x0, eps):
    def one(t):
        alpha, sigma = process.alpha_sigma(t)
        return jnp.mean(jnp.linalg.norm(gm.score(alpha * x0 + sigma * eps, alpha, sigma), axis=-1))

    return jax.vmap(one)(ts)


def _mean_score_norm(gm, process, ts, num=4000):
    """``E |score(x_t)|`` under the exact marginal at each time of ``ts`` (the batch mean of PC's step rule)."""
    x0, _ = gm.sample(jax.random.key(7), num)
    eps = jax.random.normal(jax.random.key(8), x0.shape, x0.dtype)
    return np.asarray(_score_norms(gm, process, jnp.asarray(ts, x0.dtype), x0, eps), np.float64)


def _mode_variance(solver, process, ts, var, gm=None, dim=2, score_norm=None, **kw):
    """Per-coordinate variance that ``solver`` on the grid ``ts`` gives data ``N(mu, var I)``.

    On one Gaussian the exact denoiser is affine, ``D(x, t) = mu + alpha var / C (x - alpha mu)`` with
    ``C = alpha^2 var + sigma^2``, so every step below is ``x <- m x + const + sqrt(q) z`` and the
    variance follows ``v <- m^2 v + q`` from ``v = sigma(t_max)^2`` (the prior), through the final
    denoising step ``D(x, t_min)``. Written from the papers' update rules, not from the library:

    * DDPM (Ho et al. 2020, eq. 6-7) between ``t`` and ``s < t``: posterior mean
      ``(alpha_ts sigma_s^2 / sigma_t^2) x + (alpha_s sigma_ts^2 / sigma_t^2) D`` with
      ``alpha_ts = alpha_t / alpha_s``, ``sigma_ts^2 = sigma_t^2 - alpha_ts^2 sigma_s^2``; variance
      ``beta~ = sigma_ts^2 sigma_s^2 / sigma_t^2`` or ``beta = sigma_ts^2``. DDIM with ``eta = 1`` is
      DDPM with ``beta~`` (Song et al. 2021, sec. 4.1).
    * Euler-Maruyama on the reverse SDE (Song et al. 2021, eq. 6) with the forward SDE's
      ``f = alpha' / alpha`` and ``g^2 = (sigma^2)' - 2 f sigma^2`` (differentiated here).
    * PC (score_sde): a Langevin corrector ``x + e score + sqrt(2 e) z`` with
      ``e = 2 (alpha_t / alpha_s)^2 (snr |z| / |score|)^2``, the norms averaged over the batch
      (``norm="batch"``: ``E |z|`` and ``E |score|`` under the exact marginal) or taken per example
      (``norm="example"``: see below), then the reverse-diffusion predictor
      ``x - (a - 1) x + b^2 score + b z`` (``a = alpha_t / alpha_s``, ``b^2 = sigma_t^2 - a^2 sigma_s^2``)
      or Euler-Maruyama.
    * EDM (Karras et al. 2022, alg. 2, EDM process): churn ``t_hat = (1 + gamma) t`` adds variance
      ``(t_hat^2 - t^2) s_noise^2``; then Heun on ``dy/dt = t / (var + t^2) y`` for ``y = x - mu``.
    * ALD (Song & Ermon 2019, alg. 1): ``n_steps_each`` Langevin steps ``e_i = step_lr (s_i / s_L)^2``
      at each level ``s_i = sigma / alpha`` of ``ts[1:]``.

    With ``norm="example"`` the corrector step ``e = k C^2 |z|^2 / |y|^2`` (``k = 2 (alpha_t /
    alpha_s)^2 snr^2``, ``y = x - alpha mu``) depends on the state. Taking the expectation over
    ``z`` (``E |z|^4 = D (D + 2)``) and over ``y ~ N(0, v I)`` (``E |y|^-2 = 1 / ((D - 2) v)``) gives
    ``v <- v - 2 k C + 2 k (1 + k / 2) C^2 (D + 2) / ((D - 2) v)``: the ``O(1/D)`` bias of the module
    docstring (a Gaussian moment closure; infinite in 2-D, where ``E |y|^-2`` diverges).
    ``score_norm`` (optional) is :func:`_mean_score_norm` of ``gm`` on ``ts[:-1]``, computed once per grid.
    """
    pos = jnp.asarray(ts)[:-1]  # positive times; the last is where the final denoising step is taken
    (alpha, sigma), (d_alpha, d_sigma) = jax.jvp(process.alpha_sigma, (pos,), (jnp.ones_like(pos),))
    alpha, sigma, d_alpha, d_sigma, t = (np.asarray(a, np.float64) for a in (alpha, sigma, d_alpha, d_sigma, pos))
    f = d_alpha / alpha
    g2 = 2 * sigma * d_sigma - 2 * f * sigma**2
    c = alpha**2 * var + sigma**2
    den = alpha * var / c  # dD/dx
    snr = kw.get("snr", 0.16)
    if solver == "pc" and score_norm is None and kw.get("norm", "batch") == "batch":
        score_norm = _mean_score_norm(gm, process, pos)
    v = sigma[0] ** 2
    for i in range(len(t) - 1):
        j = i + 1  # from t[i] to t[j] < t[i]
        if solver in ("ddpm", "ddim"):
            assert solver == "ddpm" or kw["eta"] == 1.0
            a_ts = alpha[i] / alpha[j]
            s2_ts = sigma[i] ** 2 - a_ts**2 * sigma[j] ** 2
            m = a_ts * sigma[j] ** 2 / sigma[i] ** 2 + alpha[j] * s2_ts / sigma[i] ** 2 * den[i]
            q = s2_ts * sigma[j] ** 2 / sigma[i] ** 2 if kw.get("variance", "beta_tilde") == "beta_tilde" else s2_ts
        elif solver in ("euler_maruyama", "pc"):
            if solver == "pc" and kw.get("corrector_steps", 1):
                assert kw.get("corrector_steps", 1) == 1
                k = 2 * (alpha[i] / alpha[j]) ** 2 * snr**2
                if kw.get("norm", "batch") == "batch":
                    e = k * (_chi_mean(dim) / score_norm[i]) ** 2
                    v = (1 - e / c[i]) ** 2 * v + 2 * e
                else:
                    v = v - 2 * k * c[i] + 2 * k * (1 + k / 2) * c[i] ** 2 * (dim + 2) / ((dim - 2) * v)
            dt = t[i] - t[j]
            if solver == "euler_maruyama" or kw.get("predictor") == "euler_maruyama":
                m, q = 1 - dt * (f[i] + g2[i] / c[i]), g2[i] * dt
            else:
                a = alpha[i] / alpha[j]
                b2 = sigma[i] ** 2 - a**2 * sigma[j] ** 2
                m, q = 2 - a - b2 / c[i], b2
        elif solver == "edm":
            gamma = min(kw["s_churn"] / (len(ts) - 1), math.sqrt(2) - 1)
            t_hat = (1 + gamma) * t[i]
            v = v + (t_hat**2 - t[i] ** 2) * kw.get("s_noise", 1.0) ** 2
            h = lambda u: u / (var + u**2)
            step = t[j] - t_hat
            m, q = 1 + step / 2 * (h(t_hat) + h(t[j]) * (1 + step * h(t_hat))), 0.0
        elif solver == "ald":
            e = kw["step_lr"] * ((sigma[j] / alpha[j]) / (sigma[-1] / alpha[-1])) ** 2
            v = v * (alpha[j] / alpha[i]) ** 2
            for _ in range(kw["n_steps_each"]):
                v = (1 - alpha[j] ** 2 * e / c[j]) ** 2 * v + 2 * alpha[j] ** 2 * e
            m, q = 1.0, 0.0
        else:
            raise ValueError(solver)
        v = m**2 * v + q
    return den[-1] ** 2 * v


def _mode_covariances(solver, process, ts, gm, **kw):
    """``(K, D, D)``: :func:`_mode_variance` for each isotropic component of ``gm``."""
    eye = np.eye(gm.dim)
    variances = np.asarray(gm.eigvals, np.float64)[:, 0]
    norms = _mean_score_norm(gm, process, jnp.asarray(ts)[:-1]) if solver == "pc" else None
    return np.stack([_mode_variance(solver, process, ts, v, gm, gm.dim, norms, **kw) * eye for v in variances])


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
    # The predictor alone: with the corrector on, the corrector's noise sets the within-mode variance at
    # low noise levels (a 10% error in the reverse-diffusion predictor's noise moves it by < 1%, measured).
    ("pc_ve_predictor_only", VE(), "pc", 200, {"corrector_steps": 0}),
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
    _check_distribution(x, gm, mode_cov=_mode_covariances(solver, process, info["ts"], gm, **kwargs))
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
    mode_cov = _mode_covariances("ald", process, info["ts"], gm, **ald)  # ALD's own bias: +18% (measured +18%)
    _check_distribution(x, gm, mean_tol=0.05, cov_rel_tol=0.03, weight_tol=0.03, mode_cov=mode_cov)


NORMS = ("batch", "example")


def _pc_on_64d_mixture(norm):
    """PC with step-size rule ``norm`` on a 64-D two-mode mixture: weights, means and within-mode variances."""
    d = 64
    means = jnp.stack([0.7 * jnp.ones(d), -0.7 * jnp.ones(d)])
    gm = analytic.GaussianMixture.isotropic(means, jnp.asarray([0.5, 0.8]), weights=[0.6, 0.4])
    process = VE()
    x_T = process.prior_sample(jax.random.key(5), (2000, d))
    x, info = jax.jit(lambda x, k: sample(gm.denoiser(process), process, x, solver="pc", steps=100, key=k, norm=norm))(
        x_T, jax.random.key(6)
    )
    assert int(info["nfe"]) == 2 * 99 + 1
    x = np.asarray(x)
    comp = (x.mean(1) < 0).astype(int)
    frac = np.bincount(comp, minlength=2) / x.shape[0]
    assert abs(frac[0] - 0.6) <= 4 * np.sqrt(0.24 / x.shape[0]) + 0.01, frac
    norms = _mean_score_norm(gm, process, info["ts"][:-1])
    # Within-component spread, pooled over the 64 coordinates.
    for k, std in enumerate([0.5, 0.8]):
        xs = x[comp == k]
        var = xs.var(0).mean()
        assert abs(var / std**2 - 1) < 0.15, (k, var)
        assert np.abs(xs.mean(0) - np.asarray(means[k])).max() < 5 * std / np.sqrt(len(xs)) + 0.02
        # Against the variance PC gives this component (exact recursion for "batch", the O(1/D)
        # moment closure for "example"): 4 standard errors of a variance pooled over d coordinates
        # (sqrt(2 / (d n))) + 1% (measured with 20 000 samples: within 0.2% for both norms).
        predicted = {n: _mode_variance("pc", process, info["ts"], std**2, gm, d, norms, norm=n) for n in NORMS}
        se = np.sqrt(2.0 / (d * (len(xs) - 1)))
        ratio = xs.var(0, ddof=1).mean() / predicted[norm]
        assert abs(ratio - 1) <= 4 * se + 0.01, (k, norm, ratio, predicted, std**2)
        # The other rule's prediction lies outside that tolerance (+3.6% / +1.7% vs +9.0% / +9.1%).
        other = predicted["batch" if norm == "example" else "example"]
        assert abs(other / predicted[norm] - 1) > 4 * se + 0.01


def test_pc_batch_norm_on_64d_mixture():
    """score_sde's batch-averaged step-size rule (the default), D = 64: within-mode variance +3.6% / +1.7%."""
    _pc_on_64d_mixture("batch")


def test_pc_per_example_norm_on_64d_mixture():
    """The per-example step-size rule (``norm="example"``) where norms concentrate (D = 64).

    Weights and means must be right; the within-mode variance carries the documented
    O(1/D) bias of a state-dependent Langevin step: predicted +9.0% / +9.1% for the two
    modes, measured +8.9% / +8.9% (20 000 samples; +8.9% / +8.6% with the 2 000 here),
    against +3.6% / +1.7% with the batch rule (the moment closure predicts +31% at
    D = 16 and +4.1% at D = 256, measured +28% and +4.1%).
    """
    _pc_on_64d_mixture("example")


def test_pc_per_example_norm_over_disperses_2d_data():
    """In 2-D the per-example rule is not a usable sampler: documented by the factor it over-disperses by.

    ``e ~ 1 / |score|^2`` and ``|score|^2 ~ chi^2_2`` near each mode, whose inverse has no mean, so
    steps explode now and then and throw samples far out. Measured on the 2-D mixture with
    200 steps (4 seeds): within-mode variance x5.2 (narrowest mode), x6.6-6.9 and x17-23 (widest
    mode, which collects the far outliers), median squared distance to the mode x5.4-5.8, mode
    weights ~0.41 / 0.35 / 0.24 instead of 0.5 / 0.3 / 0.2, samples out to |x| = 55-106.
    """
    gm, process = _mixture(), VE()
    x_T = process.prior_sample(jax.random.key(100), (N, 2))
    run = jax.jit(lambda x, k: sample(gm.denoiser(process), process, x, solver="pc", steps=200, key=k, norm="example"))
    x = np.asarray(run(x_T, jax.random.key(200))[0], np.float64)
    assert np.all(np.isfinite(x))
    comp = np.asarray(gm.component_posterior(jnp.asarray(x, jnp.float32), 1.0, 0.0)).argmax(-1)
    r2 = [np.sum((x[comp == k] - np.asarray(gm.means[k])) ** 2, axis=1) for k in range(3)]
    median_ratio = [np.median(r) / (2 * math.log(2) * s**2) for r, s in zip(r2, STDS, strict=True)]  # chi^2_2 median
    var_ratio = [np.var(x[comp == k], axis=0).mean() / s**2 for k, s in enumerate(STDS)]
    print("over-dispersion: median r^2", np.round(median_ratio, 2), "variance", np.round(var_ratio, 2))
    assert min(median_ratio) > 4.0, median_ratio  # the bulk of every mode, not only its tail
    assert min(var_ratio) > 4.0, var_ratio
    assert np.abs(x).max() > 20.0  # data lie within |x| < 5


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
