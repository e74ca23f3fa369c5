"""Distillation losses against exact answers on Gaussian mixtures (difflax.distill)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import difflax
from difflax import distill
from difflax.analytic import GaussianMixture
from difflax.data.toy2d import toy_mixture
from difflax.likelihood import encode
from difflax.metrics.sample_based import sliced_wasserstein


def _mixture():
    means = jnp.array([[-1.5, 0.0], [1.0, 1.0], [0.5, -1.2]])
    return GaussianMixture.isotropic(means, jnp.array([0.3, 0.2, 0.25]), labels=np.array([0, 1, 1]))


# ------------------------------------------------------------------ progressive distillation
def _ddim(process, z, t, s, x0_hat):
    """DDIM from ``t`` to ``s`` (per-example times): ``alpha_s x0 + (sigma_s / sigma_t)(z - alpha_t x0)``."""
    (a_t, s_t), (a_s, s_s) = process.alpha_sigma(t), process.alpha_sigma(s)
    return a_s[:, None] * x0_hat + (s_s / s_t)[:, None] * (z - a_t[:, None] * x0_hat)


@pytest.mark.parametrize("process", [difflax.VP(), difflax.EDM()], ids=["vp", "edm"])
def test_progressive_target_reproduces_two_teacher_steps(x64, process):
    """One student DDIM step with x0 = x_tilde lands exactly where two teacher DDIM steps land."""
    gm = _mixture()
    teacher = gm.denoiser(process)
    ts = difflax.make_grid("karras" if isinstance(process, difflax.EDM) else "uniform", process, 8)
    key = jax.random.key(1)
    for i in (0, 2, 6):  # i = 6 ends in the exact-zero final time
        t, t_mid, t_next = (jnp.full((16,), ts[j]) for j in (i, i + 1, i + 2))
        z = process.marginal(gm.sample(key, 16)[0], t, jax.random.normal(key, (16, 2)))
        two = _ddim(process, z, t, t_mid, teacher(z, t))
        two = _ddim(process, two, t_mid, t_next, teacher(two, t_mid))
        target = distill.progressive_target(teacher, process, z, t, t_mid, t_next)
        one = _ddim(process, z, t, t_next, target)
        np.testing.assert_allclose(one, two, rtol=1e-9, atol=1e-9)


def test_progressive_loss_zero_iff_student_matches(x64, key):
    """For a point mass DDIM is exact, so the teacher is its own 2-step student; a perturbed student is not."""
    process = difflax.VP()
    point = jnp.array([0.7, -0.4])
    teacher = lambda x, t: jnp.broadcast_to(point, x.shape)
    x0 = jnp.broadcast_to(point, (32, 2))
    ts = difflax.make_grid("uniform", process, 8)
    assert float(jnp.max(distill.progressive_loss(teacher, teacher, process, x0, key, ts))) < 1e-20
    worse = lambda x, t: teacher(x, t) + 0.01
    assert float(jnp.min(distill.progressive_loss(worse, teacher, process, x0, key, ts))) > 1e-5
    with pytest.raises(ValueError, match="even number of steps"):
        distill.progressive_loss(teacher, teacher, process, x0, key, ts[:-1])


@pytest.mark.parametrize("process,grid", [(difflax.VP(), "logsnr"), (difflax.EDM(), "karras")], ids=["vp", "edm"])
def test_progressive_loss_weighting_is_truncated_snr(x64, key, process, grid):
    """The loss of a known perturbed student, example by example: ``max(SNR(t), 1) delta(t)^2``.

    For a point mass the target is the point itself (DDIM is exact), so a student that is off by
    ``delta(t) = 0.01 (1 + t)`` in every coordinate has loss ``w(t) delta(t)^2`` at the start time
    ``t`` of its step, one of the even teacher times; ``w = max(alpha^2 / sigma^2, 1)`` is computed
    here from ``alpha`` and ``sigma``. The grids put steps on both sides of SNR = 1.
    """
    point = jnp.array([0.7, -0.4])
    teacher = lambda x, t: jnp.broadcast_to(point, x.shape)
    delta = lambda t: 0.01 * (1.0 + t)
    student = lambda x, t: teacher(x, t) + delta(t)[:, None]
    x0 = jnp.broadcast_to(point, (64, 2))
    ts = difflax.make_grid(grid, process, 8)
    loss = np.asarray(distill.progressive_loss(student, teacher, process, x0, key, ts))
    starts = ts[:-1:2]  # a student step starts at an even teacher time
    alpha, sigma = (np.asarray(a) for a in process.alpha_sigma(starts))
    snr = alpha**2 / sigma**2
    closed_form = np.maximum(snr, 1.0) * np.asarray(delta(starts)) ** 2
    assert np.min(np.abs(np.log(closed_form[:, None] / closed_form[None])) + np.eye(4)) > 1e-3  # distinct
    match = np.abs(loss[:, None] / closed_form[None] - 1) < 1e-9
    assert np.all(match.sum(1) == 1), (loss, closed_form)  # every example has one closed-form loss
    used = match.any(0)
    assert used[snr > 1].any() and used[snr < 1].any(), snr  # both branches of the max


# ------------------------------------------------------------------ consistency models
def _exact_flow_map(gm, process):
    """The exact consistency function: the probability-flow ODE solved to t_min (adaptive, tight)."""

    def one(x, t):  # one example, its own start time
        ts = jnp.stack([t, jnp.asarray(process.t_min, x.dtype)])
        return difflax.sample(gm.denoiser(process), process, x[None], solver="adaptive", steps=1, grid=ts,
                              final_zero=False, rtol=1e-9, atol=1e-9)[0][0]

    return jax.jit(jax.vmap(one))


def test_consistency_boundary_condition(x64, key):
    process = difflax.EDM()
    net = lambda x, c: jnp.sin(x) + c[:, None]  # any network
    f = distill.consistency_function(net, process)
    x = jax.random.normal(key, (8, 2))
    np.testing.assert_allclose(f(x, jnp.full((8,), process.t_min)), x, rtol=1e-12)
    assert float(jnp.max(jnp.abs(f(x, jnp.full((8,), 1.0)) - x))) > 1e-2


def test_consistency_distillation_target_is_the_exact_ode_endpoint(x64, key):
    """With the exact denoiser as teacher, f*(teacher Heun step) = f*(x_{n+1}) up to Heun's O(h^3) local error."""
    gm, process = _mixture(), difflax.EDM(t_max=20.0)
    f_star = _exact_flow_map(gm, process)
    x0 = gm.sample(key, 8)[0]
    errors = []
    for gap in (0.4, 0.2, 0.1):
        s_hi, s_lo = 1.0, 1.0 - gap
        x_hi = x0 + s_hi * jax.random.normal(jax.random.key(3), x0.shape)
        t_hi, t_lo = jnp.full((8,), s_hi), jnp.full((8,), s_lo)
        x_lo = distill.ode_step(gm.denoiser(process), process, x_hi, t_hi, t_lo, "heun")
        errors.append(float(jnp.max(jnp.abs(f_star(x_lo, t_lo) - f_star(x_hi, t_hi)))))
    assert errors[-1] < 1e-3
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all(orders > 2.5), (errors, orders)
    # the loss itself, with student = target = f*, is that error through the distance
    # (consistency training's target, the same noise at the lower level, is far off the trajectory)
    kw = dict(num_levels=200, max_levels=200, distance_kind="l2", s_max=2.0)
    loss_cd = distill.consistency_loss(f_star, f_star, process, x0, key, teacher=gm.denoiser(process), **kw)
    loss_ct = distill.consistency_loss(f_star, f_star, process, x0, key, **kw)
    assert float(jnp.max(loss_cd)) < 1e-3
    assert float(jnp.mean(loss_cd)) < 0.01 * float(jnp.mean(loss_ct))


@pytest.mark.parametrize("process", [difflax.EDM(), difflax.VP()], ids=["edm", "vp"])
def test_consistency_training_fixed_point_is_the_exact_flow_map(x64, key, process):
    """Consistency training's loss vanishes at the exact consistency function of a point mass.

    For data at a point ``p`` the denoiser is ``p``, so in the scaled variables the probability-flow
    ODE ``dy/ds = (y - p) / s`` has straight paths ``y(s) = p + s z``: CT's pair ``(x0 + s_{n+1} z,
    x0 + s_n z)`` lies on one path, and ``f*(x, t) = p + (s_min / s)(x / alpha - p)`` maps both to
    ``p + s_min z``. In the family ``f_theta = p + (s_min / s)^theta (y - p)`` (each satisfying the
    boundary condition) the loss is zero at ``theta = 1`` with zero gradient, and positive elsewhere.
    """
    point = jnp.array([0.7, -0.4])
    s_min = process.sigma(process.t_min) / process.alpha(process.t_min)

    def family(theta):
        def f(x, t):
            alpha, sigma = process.alpha_sigma(t)
            return point + (s_min / (sigma / alpha))[:, None] ** theta * (x / alpha[:, None] - point)

        return f

    x0 = jnp.broadcast_to(point, (64, 2))
    settings = [
        dict(num_levels=18, max_levels=18),
        dict(num_levels=150, max_levels=200, noise="lognormal", weighting="inverse_gap", distance_kind="l2"),
    ]
    for kw in settings:
        loss = lambda theta: distill.consistency_loss(family(theta), family(theta), process, x0, key, **kw)
        assert float(jnp.max(loss(1.0))) < 1e-20
        grad = jax.grad(lambda theta: jnp.mean(loss(theta)))(1.0)
        assert abs(float(grad)) < 1e-10
        for theta in (0.9, 1.1):
            assert float(jnp.min(loss(theta))) > 0 and float(jnp.mean(loss(theta))) > 1e-9, (kw, theta)


def test_consistency_sample_with_exact_map_is_exact(x64, key):
    """One-step and two-step consistency sampling with the exact flow map give the data distribution."""
    gm, process = _mixture(), difflax.EDM(t_max=20.0)
    f_star = _exact_flow_map(gm, process)
    x_T = process.prior_sample(key, (600, 2), jnp.float64)
    for ts in ([20.0], [20.0, 0.8]):
        x, info = distill.consistency_sample(f_star, process, x_T, jax.random.key(5), jnp.array(ts))
        assert info["nfe"] == len(ts)
        np.testing.assert_allclose(jnp.mean(x, 0), gm.mean(), atol=0.1)
        np.testing.assert_allclose(jnp.cov(x.T), gm.covariance(), atol=0.15)
        # not collapsed to the mean, as one Euler step of the teacher would be
        assert float(jnp.trace(jnp.cov(x.T))) > 0.8 * float(jnp.trace(gm.covariance()))


def test_consistency_schedules():
    assert int(distill.ict_curriculum(0, 1000)) == 11
    assert int(distill.ict_curriculum(999, 1000)) == 1281
    k_prime = 1000 // 8  # log2(1280 / 10) + 1 = 8 stages
    assert [int(distill.ict_curriculum(k, 1000)) for k in (k_prime - 1, k_prime, 2 * k_prime)] == [11, 21, 41]
    assert int(distill.ct_curriculum(0, 1000)) == 2 and int(distill.ct_curriculum(1000, 1000)) == 151
    np.testing.assert_allclose(distill.ct_target_decay(2), 0.9, rtol=1e-6)
    levels = distill.karras_levels(18, 0.002, 80.0, max_levels=20)
    np.testing.assert_allclose([levels[0], levels[17], levels[19]], [0.002, 80.0, 80.0], rtol=1e-5)
    assert bool(jnp.all(jnp.diff(levels[:18]) > 0))


def test_lognormal_level_sampling_matches_its_probabilities(key):
    from scipy.special import erf

    levels = distill.karras_levels(11, 0.002, 80.0, max_levels=21)
    n = distill.sample_level_index(key, (40000,), levels, 11, "lognormal")
    assert int(n.max()) <= 9 and int(n.min()) >= 0
    lv = np.asarray(levels[:11], np.float64)
    cdf = erf((np.log(lv) + 1.1) / (np.sqrt(2) * 2.0))
    p = np.diff(cdf) / np.sum(np.diff(cdf))
    freq = np.bincount(np.asarray(n), minlength=10)[:10] / 40000
    np.testing.assert_allclose(freq, p, atol=0.01)


def test_distances(key):
    x = jax.random.normal(key, (4, 3, 3, 1))
    y = x + 0.5
    d = distill.distance(x, y, "pseudo_huber")
    c = 0.00054 * 3.0
    np.testing.assert_allclose(d, np.sqrt(9 * 0.25 + c**2) - c, rtol=1e-5)
    np.testing.assert_allclose(distill.distance(x, y, "l2"), 0.25, rtol=1e-6)
    np.testing.assert_allclose(distill.distance(x, y, "l1"), 0.5, rtol=1e-6)
    assert float(jnp.max(distill.distance(x, x))) == 0.0
    with pytest.raises(ValueError, match="distance must be one of"):
        distill.distance(x, y, "lpips")


# ------------------------------------------------------------------ reflow
def test_reflow_pairs_are_exact_ode_couplings(x64, key):
    """Pairs from the exact denoiser's ODE sampler encode back (forward ODE) to their noise."""
    gm, process = _mixture(), difflax.Flow()
    x_T = process.prior_sample(key, (64, 2), jnp.float64)
    pairs = distill.teacher_trajectories(gm.denoiser(process), process, x_T, steps=400, solver="heun",
                                         grid="uniform", save_steps=[399])  # the state at t_min
    np.testing.assert_allclose(pairs["times"], [process.t_min], rtol=1e-12)
    back = encode(gm.denoiser(process), process, pairs["intermediates"][0], rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(back, pairs["noise"], atol=5e-3)


def test_reflow_loss_zero_for_straight_coupling(x64, key):
    """A translation coupling x0 = z + m has constant velocity -m; the denoiser x_t + t m has zero loss."""
    m = jnp.array([0.8, -0.3])
    z = jax.random.normal(key, (64, 2))
    student = lambda x, t: x + t[:, None] * m
    loss = distill.reflow_loss(student, z + m, z, jax.random.key(2))
    assert float(jnp.max(loss)) < 1e-20
    bent = lambda x, t: x + t[:, None] * m + 0.05 * jnp.sin(x)
    assert float(jnp.min(distill.reflow_loss(bent, z + m, z, jax.random.key(2)))) > 0


@pytest.mark.parametrize("weighting", ["simple", "edm"])
def test_reflow_loss_closed_form_on_a_curved_coupling(x64, key, weighting):
    """A coupling that is not a translation and a student off by a known velocity error.

    ``x0 = 0.5 z^3 + sin(z)`` couples data and noise non-linearly. For the flow interpolant
    ``x_t = (1 - t) x0 + t z`` a denoiser ``D = x_t - t (u + e)`` has velocity ``(x_t - D) / t =
    u + e``, with ``u = z - x0`` the target. With ``e = delta / sqrt(w(t))`` the loss is
    ``mean(delta^2)`` per example for every ``t``: ``w = 1`` ("simple") or, for "edm", the eps weight
    ``1 + sigma^2 / (alpha^2 sd^2)`` times ``(d eps / d v)^2 = alpha^2``, i.e. ``(1 - t)^2 + t^2 / sd^2``
    (derived here: ``eps = x_t + (1 - t) v`` at fixed ``x_t``; ``sd = 0.5``).
    """
    z = jax.random.normal(key, (64, 2))
    x0 = 0.5 * z**3 + jnp.sin(z)
    delta = jax.random.normal(jax.random.key(3), (64, 2))
    weight = {"simple": lambda t: jnp.ones_like(t), "edm": lambda t: (1 - t) ** 2 + t**2 / 0.25}[weighting]
    student = lambda x, t: x - t[:, None] * (z - x0 + delta / jnp.sqrt(weight(t))[:, None])
    loss = distill.reflow_loss(student, x0, z, jax.random.key(2), weighting=weighting)
    np.testing.assert_allclose(loss, jnp.mean(delta**2, axis=1), rtol=1e-10)
    assert float(jnp.min(loss)) > 1e-3
    exact = lambda x, t: x - t[:, None] * (z - x0)  # the coupling's own velocity: zero loss
    assert float(jnp.max(distill.reflow_loss(exact, x0, z, jax.random.key(2), weighting=weighting))) < 1e-20


def test_straightness():
    ts = jnp.linspace(1.0, 0.0, 2001)
    tau = 1.0 - ts
    straight = jnp.stack([tau, 2 * tau], axis=1)[:, None, :]  # constant speed along a line
    assert float(distill.straightness(straight, ts)[0]) < 1e-6
    quadratic = (tau**2)[:, None, None]  # straight path, uneven speed: S = int (2 tau - 1)^2 = 1/3
    np.testing.assert_allclose(distill.straightness(quadratic, ts)[0], 1 / 3, rtol=1e-3)


# ------------------------------------------------------------------ guidance distillation
def test_guidance_distillation_loss_zero_for_the_guided_teacher(x64, key):
    gm, process = _mixture(), difflax.VP()
    cond = gm.conditional_denoiser(process)
    null = 2  # the mixture has classes 0 and 1

    def teacher(x, t, y):
        uncond = gm.denoiser(process)(x, t)
        return jnp.where((y == null)[:, None], uncond, cond(x, t, jnp.minimum(y, 1)))

    def exact_student(x, t, w):
        y = jnp.tile(jnp.array([0, 1]), x.shape[0] // 2)
        return (1 + w[:, None]) * cond(x, t, y) - w[:, None] * gm.denoiser(process)(x, t)

    x0, _ = gm.sample(key, 32)
    y = jnp.tile(jnp.array([0, 1]), 16)
    t = jnp.linspace(0.05, 0.95, 32)
    loss = distill.guidance_distillation_loss(exact_student, teacher, y, process, x0, t, key, null=null)
    assert float(jnp.max(loss)) < 1e-20
    unguided = lambda x, t, w: cond(x, t, y)
    assert float(jnp.mean(distill.guidance_distillation_loss(unguided, teacher, y, process, x0, t, key,
                                                             null=null))) > 1e-4


def test_ect_pairs_and_stage_zero_fixed_point(x64, key):
    """ECT's pair ``r = max(s (1 - n(s) / q^a), s_min)``, ``n(s) = 1 + 8 sigmoid(-s)``, against NumPy; at stage 0
    every pair ends at ``s_min``, and the loss (L2 distance) is minimal at the posterior mean of its target
    ``x0 + s_min z``.

    For data ``N(mu, sd^2)`` in one dimension and ``x_s = x0 + s z`` the target's posterior mean is linear:
    ``mu + (sd^2 + s_min s) / (sd^2 + s^2) (x_s - mu)``; the student ``f_c`` scales its slope by ``c``.
    """
    s = jnp.array([0.01, 0.3, 1.0, 5.0, 80.0])
    s_min = 0.002
    n = 1 + 8 / (1 + np.exp(np.asarray(s)))
    for stage in (0, 1, 3, 7):
        expected = np.maximum(np.asarray(s) * (1 - n / 2.0**stage), s_min)
        np.testing.assert_allclose(distill.ect_pair(s, stage, s_min), expected, rtol=1e-12)
    assert bool(jnp.all(distill.ect_pair(s, 0, s_min) == s_min))

    process, mu, sd, num = difflax.EDM(), 0.4, 0.5, 400_000
    x0 = mu + sd * jax.random.normal(key, (num, 1), jnp.float64)

    def student(c):
        def f(x_t, t):
            slope = (sd**2 + s_min * t) / (sd**2 + t**2)
            return mu + c * slope[:, None] * (x_t - mu)

        return f

    def loss(c):  # the target at s_min is the identity, as for every consistency function
        f = student(c)
        identity = lambda x, t: x
        return jnp.mean(distill.ect_loss(f, identity, process, x0, jax.random.key(3), stage=0, distance_kind="l2"))

    grad = jax.grad(loss)  # linear in c: the loss is a weighted least-squares fit of the slope
    curvature = (float(grad(1.1)) - float(grad(0.9))) / 0.2
    optimum = 1.0 - float(grad(1.0)) / curvature
    assert curvature > 0 and abs(optimum - 1.0) < 0.002, (optimum, curvature)


# ------------------------------------------------------------------ DMD
def test_dmd_generator_gradient(x64, key):
    """dL/dx is the normalized denoiser difference, and vanishes when the fake model equals the real one."""
    gm, process = _mixture(), difflax.EDM()
    real = gm.denoiser(process)
    other = GaussianMixture.isotropic(gm.means + 0.3, 0.3).denoiser(process)
    x = gm.sample(key, 16)[0]
    grad = jax.grad(lambda x: jnp.sum(distill.dmd_generator_loss(x, real, other, process, jax.random.key(4))))(x)
    k_t, k_eps = jax.random.split(jax.random.key(4))
    lam_lo, lam_hi = process.log_snr(process.t_max), process.log_snr(process.t_min)
    lam = jax.random.uniform(k_t, (16,), x.dtype, lam_lo + 0.02 * (lam_hi - lam_lo), lam_lo + 0.98 * (lam_hi - lam_lo))
    t = process.t_from_log_snr(lam)
    x_t = process.marginal(x, t, jax.random.normal(k_eps, x.shape, x.dtype))
    expected = (other(x_t, t) - real(x_t, t)) / jnp.mean(jnp.abs(x - real(x_t, t)), axis=1, keepdims=True)
    np.testing.assert_allclose(grad, expected, rtol=1e-10)
    same = jax.grad(lambda x: jnp.sum(distill.dmd_generator_loss(x, real, real, process, key)))(x)
    assert float(jnp.max(jnp.abs(same))) == 0.0
    fake_loss = distill.dmd_fake_loss(real, process, x, key, weighting="simple")
    assert fake_loss.shape == (16,) and bool(jnp.all(fake_loss >= 0))


def test_dmd_fake_loss_closed_form_on_gaussians(x64, key):
    """The fake-score loss against closed forms, on Gaussian and point-mass "generated" samples.

    (1) Samples ``x ~ N(mu, sd^2 I)`` with ``sd`` the process's ``sigma_data`` and the fake denoiser
    exact for that Gaussian: ``D - x0 ~ N(0, v I)`` given ``x_t`` with posterior variance
    ``v = sd^2 sigma^2 / (alpha^2 sd^2 + sigma^2)``, and the EDM weight ``alpha^2 / sigma^2 + 1 / sd^2`` is
    ``1 / v``, so every example's loss is ``chi^2_D / D`` whatever its noise level (Karras et al. 2022,
    the unit loss of the optimal denoiser). (2) A point mass and a fake off by ``delta / sqrt(w(t))``
    have loss ``mean(delta^2)`` exactly, ``w`` computed here from ``alpha`` and ``sigma``.
    """
    from scipy import stats

    process, dim, num = difflax.EDM(), 4, 4000
    sd = process.sigma_data
    mu = jnp.array([0.3, -0.2, 0.5, 0.0])
    gauss = GaussianMixture.isotropic(mu[None], sd)
    x = gauss.sample(key, num)[0]
    loss = np.asarray(distill.dmd_fake_loss(gauss.denoiser(process), process, x, jax.random.key(1)))
    assert loss.shape == (num,)
    se = np.sqrt(2.0 / (num * dim))  # of the mean of chi^2_D / D over the batch
    assert abs(loss.mean() - 1.0) < 4 * se, (loss.mean(), se)
    assert stats.kstest(loss * dim, stats.chi2(dim).cdf).pvalue > 1e-3
    # the fake of another Gaussian is worse on average
    other = GaussianMixture.isotropic(mu[None] + 0.3, sd).denoiser(process)
    assert float(jnp.mean(distill.dmd_fake_loss(other, process, x, jax.random.key(1)))) > 1.1

    point = jnp.broadcast_to(mu, (64, dim))
    delta = jax.random.normal(jax.random.key(2), (64, dim))
    for weighting in ("edm", "snr", "simple"):
        w = {
            "edm": lambda a, s: a**2 / s**2 + 1 / sd**2,
            "snr": lambda a, s: a**2 / s**2,
            "simple": lambda a, s: jnp.ones_like(s),
        }[weighting]

        def fake(x_t, t, w=w):
            return mu + delta / jnp.sqrt(w(*process.alpha_sigma(t)))[:, None]

        loss = distill.dmd_fake_loss(fake, process, point, jax.random.key(5), weighting=weighting)
        np.testing.assert_allclose(loss, jnp.mean(delta**2, axis=1), rtol=1e-10)


def test_dmd2_gan_losses_fixed_point_is_the_log_density_ratio(x64, key):
    """The discriminator loss is stationary at the log ratio of the noised real and fake densities
    (Goodfellow et al. 2014, proposition 1, at every noise level), and not at a scaled one; the
    generator's GAN gradient moves fake samples toward the real ones.

    Real ``N(m_r, s^2)`` and fake ``N(m_f, s^2)`` in one dimension under EDM noise ``sigma(t)``: both noised
    marginals have variance ``v = s^2 + sigma^2``, so the optimal logit is
    ``L(x, t) = ((x - m_f)^2 - (x - m_r)^2) / (2 v)``. The critic ``theta L`` has expected loss gradient
    ``d/dtheta = E_real[-sigmoid(-L) L] + E_fake[sigmoid(L) L]``, zero at ``theta = 1``.
    """
    process, num, s, m_r, m_f = difflax.EDM(), 400_000, 0.3, 0.5, -0.4

    def log_ratio(x_t, t):
        v = s**2 + process.sigma(t) ** 2
        return ((x_t[:, 0] - m_f) ** 2 - (x_t[:, 0] - m_r) ** 2) / (2 * v)

    k_r, k_f, k_loss = jax.random.split(key, 3)
    real = m_r + s * jax.random.normal(k_r, (num, 1), jnp.float64)
    fake = m_f + s * jax.random.normal(k_f, (num, 1), jnp.float64)

    def loss(theta):
        return jnp.mean(distill.dmd_critic_loss(lambda x, t: theta * log_ratio(x, t), fake, real, process, k_loss))

    grad = jax.grad(loss)
    assert abs(float(grad(1.0))) < 2e-3, float(grad(1.0))
    assert float(grad(0.5)) < -0.02 and float(grad(2.0)) > 0.02  # a convex loss around its minimum
    # constant logits: the losses are softplus(-c) + softplus(c) and softplus(-c) exactly
    c = 0.7
    np.testing.assert_allclose(
        distill.dmd_critic_loss(lambda x, t: jnp.full(x.shape[:1], c), fake[:8], real[:8], process, key),
        jax.nn.softplus(-c) + jax.nn.softplus(c),
        rtol=1e-14,
    )
    gen = jax.grad(lambda x: jnp.sum(distill.dmd_generator_gan_loss(log_ratio, x, process, k_loss)))(fake)
    assert float(jnp.mean(gen)) < 0 and float(jnp.mean(gen < 0)) == 1.0  # every descent step moves toward m_r


# ------------------------------------------------------------------ trajectories
def test_teacher_trajectories_roundtrip(tmp_path, key):
    gm, process = _mixture(), difflax.VP()
    x_T = process.prior_sample(key, (5, 2))
    data = distill.teacher_trajectories(gm.denoiser(process), process, x_T, steps=10, save_steps=[0, 4, 10])
    full, info = difflax.sample(gm.denoiser(process), process, x_T, solver="ddim", steps=10, return_trajectory=True)
    np.testing.assert_allclose(data["intermediates"][1], info["trajectory"][4], rtol=1e-6)
    np.testing.assert_allclose(data["intermediates"][0], x_T)
    np.testing.assert_allclose(data["x0"], full)
    path = distill.save_trajectories(str(tmp_path / "traj"), data)
    assert [p.name for p in tmp_path.iterdir()] == ["traj.npz"]  # no temporary file left behind
    back = distill.load_trajectories(path)
    for k in data:
        np.testing.assert_allclose(back[k], data[k])
    with pytest.raises(ValueError, match="save_steps must lie in"):
        distill.teacher_trajectories(gm.denoiser(process), process, x_T, steps=10, save_steps=[11])
    with pytest.raises(FileNotFoundError):
        distill.load_trajectories(str(tmp_path / "missing"))


# ------------------------------------------------------------------ a short distillation run
def test_short_consistency_distillation_beats_teacher_one_step():
    """Consistency distillation of the exact toy-grid denoiser into a small MLP, 1-step sliced W2."""
    import optax

    from difflax.models import MLPResNet
    from difflax.train.fit import fit

    gm, process = toy_mixture("grid"), difflax.EDM(sigma_data=1.0, t_max=20.0)
    teacher = gm.denoiser(process)
    model = MLPResNet(features=64, num_blocks=2, embedding="fourier", fourier_scale=1.0)
    params = model.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]

    def f(p):
        return distill.consistency_function(lambda x, c: model.apply({"params": p}, x, c), process)

    def loss_fn(p, batch, k, state):
        loss = distill.consistency_loss(f(p), f(state.ema_params), process, batch["x"], k, num_levels=18,
                                        max_levels=18, teacher=teacher)
        return jnp.mean(loss), {}

    @jax.jit
    def batches(step):
        return {"x": gm.sample(jax.random.fold_in(jax.random.key(1), step), 128)[0]}

    state, history = fit(loss_fn, params, optax.adam(2e-3), batches, 300, key=jax.random.key(2), ema=0.9)
    assert history[-1]["loss"] < history[0]["loss"]
    x_T = process.prior_sample(jax.random.key(3), (2000, 2))
    data = gm.sample(jax.random.key(4), 2000)[0]
    student, _ = distill.consistency_sample(f(state.params), process, x_T, key=None, ts=jnp.array([20.0]))
    one_step, _ = difflax.sample(teacher, process, x_T, solver="euler", steps=1)
    sw_student = float(sliced_wasserstein(student, data, key=jax.random.key(5)))
    sw_teacher = float(sliced_wasserstein(one_step, data, key=jax.random.key(5)))
    assert sw_student < 0.5 * sw_teacher, (sw_student, sw_teacher)
