"""Forward processes: marginals, SDEs, log-SNR and its inverse, input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.integrate import solve_ivp

from difflax import VP, DiscreteVP, Flow
from difflax.processes import PROCESSES, once_per_batch

FACTORIES = PROCESSES
NAMES = list(FACTORIES)


def _interior_times(p, n):
    lo, hi = float(p.t_min), float(p.t_max)
    if isinstance(p, Flow):
        hi = 0.999
    return np.linspace(lo, hi, n)


@pytest.mark.parametrize("name", NAMES)
def test_marginal_moments_monte_carlo(name, key):
    p = FACTORIES[name]()
    n = 100_000
    x0 = jnp.full((n, 1), 1.5)
    for i, t in enumerate(_interior_times(p, 4)):
        eps = jax.random.normal(jax.random.fold_in(key, i), (n, 1))
        xt = np.asarray(p.marginal(x0, jnp.float32(t), eps), dtype=np.float64)
        alpha, sigma = float(p.alpha(t)), float(p.sigma(t))
        se = sigma / np.sqrt(n)
        assert abs(xt.mean() - 1.5 * alpha) < 5 * se + 1e-6 * abs(alpha)
        assert abs(xt.std() / sigma - 1) < 5 / np.sqrt(2 * n)


@pytest.mark.parametrize("name", NAMES)
def test_sde_reproduces_marginal_moments(name, x64):
    """Integrate dm/dt = f m, dv/dt = 2 f v + g^2 and recover alpha(t) and sigma(t)^2."""
    p = FACTORIES[name]()
    ts = _interior_times(p, 5)
    t_a, t_b = ts[1], ts[3]
    if isinstance(p, DiscreteVP):  # piecewise-constant beta: a short span keeps the solve cheap
        t_b = t_a + 0.01
    coefficients = jax.jit(p.sde_coefficients)

    def rhs(t, y):
        f, g = (float(c) for c in coefficients(np.float64(t)))
        return [f * y[0], 2 * f * y[1] + g**2]

    y0 = [float(p.alpha(t_a)), float(p.sigma(t_a)) ** 2]
    max_step = 0.5 / p.num_steps if isinstance(p, DiscreteVP) else np.inf
    sol = solve_ivp(rhs, (t_a, t_b), y0, method="DOP853", rtol=1e-11, atol=1e-14, max_step=max_step)
    m, v = sol.y[:, -1]
    np.testing.assert_allclose(m, float(p.alpha(t_b)), rtol=1e-6)
    np.testing.assert_allclose(v, float(p.sigma(t_b)) ** 2, rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_sde_shapes(name):
    p = FACTORIES[name]()
    x = jnp.ones((3, 4, 4, 2))
    t = jnp.array([0.2, 0.5, 0.7]) * float(p.t_max)
    drift, diffusion = p.sde(x, t)
    assert drift.shape == x.shape and diffusion.shape == (3, 1, 1, 1)
    f, _ = p.sde_coefficients(t)
    np.testing.assert_allclose(drift[:, 0, 0, 0], f, rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_log_snr_strictly_decreasing(name, x64):
    p = FACTORIES[name]()
    t = jnp.asarray(_interior_times(p, 4001))
    lam = p.log_snr(t)
    assert bool(jnp.all(jnp.isfinite(lam)))
    assert bool(jnp.all(jnp.diff(lam) < 0))


@pytest.mark.parametrize("name", NAMES)
@given(u=st.floats(0.0, 1.0))
def test_t_from_log_snr_round_trip(name, u):
    with jax.enable_x64(True):
        p = FACTORIES[name]()
        lo, hi = float(p.t_min), float(p.t_max)
        if isinstance(p, Flow):
            lo, hi = 1e-6, 1 - 1e-6
        # Log-uniform in t reaches the small-t end, where naive inverses lose digits.
        t = jnp.float64(lo * (hi / lo) ** u)
        t_back = p.t_from_log_snr(p.log_snr(t))
        assert abs(float(t_back) / float(t) - 1) < 1e-6


@pytest.mark.parametrize("name", ["vp", "subvp", "flow", "edm"])
def test_round_trip_at_extreme_log_snr(name, x64):
    p = FACTORIES[name]()
    t = jnp.asarray([1e-7, 1e-5, 1e-3, 0.5, 0.999999]) * float(p.t_max)
    np.testing.assert_allclose(p.t_from_log_snr(p.log_snr(t)), t, rtol=1e-6)
    lam = jnp.asarray([-20.0, -5.0, 0.0, 5.0, 20.0, 30.0])
    np.testing.assert_allclose(p.log_snr(p.t_from_log_snr(lam)), lam, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_jit_vmap_grad(name):
    p = FACTORIES[name]()
    t = jnp.asarray(_interior_times(p, 3), jnp.float32)
    np.testing.assert_allclose(jax.jit(p.sigma)(t), jax.vmap(p.sigma)(t), rtol=1e-6)
    # Forward-mode derivative agrees with a central difference.
    _, d_sigma = p.alpha_sigma_derivatives(t[1])
    h = 1e-3 * float(p.t_max)
    fd = (p.sigma(t[1] + h) - p.sigma(t[1] - h)) / (2 * h)
    np.testing.assert_allclose(d_sigma, fd, rtol=2e-2)
    assert jnp.isfinite(jax.grad(lambda s: p.log_snr(s))(t[1]))


@pytest.mark.parametrize("name", NAMES)
def test_prior_sample_scale(name, key):
    p = FACTORIES[name]()
    z = p.prior_sample(key, (20_000, 2))
    np.testing.assert_allclose(np.std(np.asarray(z)), float(p.sigma(p.t_max)), rtol=0.03)


def test_vp_matches_score_sde_formulas(x64):
    p = VP()
    t = jnp.linspace(1e-3, 1.0, 11)
    log_mean_coeff = -0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1
    np.testing.assert_allclose(p.alpha(t), jnp.exp(log_mean_coeff), rtol=1e-12)
    np.testing.assert_allclose(p.sigma(t), jnp.sqrt(1 - jnp.exp(2 * log_mean_coeff)), rtol=1e-12)


def test_discrete_vp_tables(x64):
    p = DiscreteVP.linear()
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(p.alphas_cumprod, abar, rtol=1e-10)
    np.testing.assert_allclose(p.betas, betas, rtol=1e-8)
    n = np.array([0, 1, 499, 999])
    t = p.time_from_timestep(n)
    np.testing.assert_allclose(p.alpha(t) ** 2, abar[n], rtol=1e-10)
    np.testing.assert_allclose(p.timestep(t), n, atol=1e-9)
    # Log-space interpolation: halfway between knots alpha_bar is the geometric mean.
    mid = (t[2] + 0.5 / 1000)
    np.testing.assert_allclose(p.alpha(mid) ** 2, np.sqrt(abar[499] * abar[500]), rtol=1e-10)
    assert float(p.alpha(0.0)) == 1.0
    # SDE beta on a segment is minus the slope of log alpha_bar, close to the table's beta * N.
    _, g = p.sde_coefficients(t[2] + 0.25 / 1000)
    np.testing.assert_allclose(g**2, -np.log1p(-betas[500]) * 1000, rtol=1e-10)


def test_cosine_schedule_matches_nichol_dhariwal(x64):
    p = DiscreteVP.cosine()
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    n = np.arange(1000)
    betas = np.minimum(1 - f((n + 1) / 1000) / f(n / 1000), 0.999)
    np.testing.assert_allclose(p.betas, betas, rtol=1e-8)
    assert float(p.betas[-1]) == pytest.approx(0.999)


def test_scaled_linear_schedule(x64):
    p = DiscreteVP.scaled_linear()
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    np.testing.assert_allclose(p.betas, betas, rtol=1e-8)


SCHEDULES = {
    "linear": DiscreteVP.linear,
    "cosine": DiscreteVP.cosine,
    "scaled_linear": DiscreteVP.scaled_linear,
    "short": lambda: DiscreteVP.linear(7, 0.01, 0.3),
}


def _lookup_times(knots):
    """A fine grid of [0, 1], every knot, its float neighbours, the rounded n / N, and both ends."""
    dtype = knots.dtype
    n = knots.shape[0] - 1
    return jnp.concatenate(
        [
            jnp.linspace(0.0, 1.0, 20_011, dtype=dtype),
            knots,
            jnp.nextafter(knots, jnp.asarray(2.0, dtype)),
            jnp.nextafter(knots, jnp.asarray(-1.0, dtype)),
            jnp.arange(n + 1, dtype=dtype) / n,
            jnp.asarray([0.0, 1.0, 1e-7, 1.0 - 1e-7], dtype),
        ]
    )


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("double", [False, True], ids=["float32", "x64"])
def test_discrete_vp_lookup_matches_interp(schedule, double):
    """The direct-index lookup gives the values of ``jnp.interp`` on the knots ``n / N`` (and of its
    inverse on the reversed table), in float32 and with x64, jitted, and the same derivative."""
    with jax.enable_x64(double):
        p = SCHEDULES[schedule]()
        dtype = jnp.float64 if double else jnp.float32
        knots, table = p._knots().astype(dtype), p.log_alpha_bar.astype(dtype)
        t = _lookup_times(knots)

        def reference(t):
            la = jnp.interp(t, knots, table)
            return {
                "alpha": jnp.exp(0.5 * la),
                "sigma": jnp.sqrt(-jnp.expm1(la)),
                "log_snr": la - jnp.log(-jnp.expm1(la)),
            }

        got = jax.jit(lambda t: {"alpha": p.alpha(t), "sigma": p.sigma(t), "log_snr": p.log_snr(t)})(t)
        for name, want in jax.jit(reference)(t).items():
            np.testing.assert_allclose(got[name], want, rtol=1e-7, atol=0, err_msg=name)
        slope = jax.jit(jax.vmap(jax.grad(p.log_alpha_bar_at)))(t)
        np.testing.assert_allclose(slope, jax.vmap(jax.grad(lambda t: jnp.interp(t, knots, table)))(t), rtol=1e-7)

        log_snr = jnp.concatenate([jnp.linspace(-30.0, 30.0, 20_001, dtype=dtype), reference(knots[1:])["log_snr"]])
        la = -jax.nn.softplus(-log_snr)
        want = jnp.interp(la, table[::-1], knots[::-1])
        np.testing.assert_allclose(jax.jit(p.t_from_log_snr)(log_snr), want, rtol=1e-7, atol=0)


def test_discrete_vp_lookup_compiles_without_loops():
    """Per-example lookups (``t`` of shape ``(batch,)``) compile without a ``while`` loop (a binary search would)."""
    p = DiscreteVP.linear()
    t = jnp.linspace(0.01, 1.0, 256)
    for name in ("alpha", "sigma", "log_snr", "t_from_log_snr", "alpha_sigma_derivatives"):
        hlo = jax.jit(getattr(p, name)).lower(t).compile().as_text()
        assert hlo.count("while") == 0, name


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="t must lie in"):
        DiscreteVP.linear().alpha(1.5)
    with pytest.raises(ValueError, match="t must lie in"):
        Flow().marginal(jnp.ones((2, 3)), 1.2, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="eps must have the shape of x0"):
        VP().marginal(jnp.ones((2, 3)), 0.5, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="batch size"):
        VP().marginal(jnp.ones((2, 3)), jnp.array([0.1, 0.2, 0.3]), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="betas must lie strictly between 0 and 1"):
        DiscreteVP.from_betas([0.1, 1.2])
    # Traced t is not checked (no cost inside jit), concrete in-range t passes.
    jax.jit(DiscreteVP.linear().alpha)(0.5)


def test_once_per_batch_computes_a_shared_time_once():
    p = DiscreteVP.linear()

    def coefficients(t):
        return p.alpha(t), p.t_from_log_snr(p.log_snr(t))

    def evaluations(t):  # how many entries fn saw: 1 where the time was computed once
        return jnp.full(jnp.shape(t), jnp.size(t), jnp.int32)

    once = jax.jit(lambda t: (once_per_batch(coefficients, t), once_per_batch(evaluations, t)))
    for t, seen in [(jnp.full((5,), 0.3), 1), (jnp.linspace(0.1, 0.9, 5), 5), (jnp.asarray(0.3), 1)]:
        got, count = once(t)
        for g, w in zip(got, jax.jit(coefficients)(t), strict=True):
            np.testing.assert_array_equal(g, jnp.broadcast_to(w, t.shape))
        np.testing.assert_array_equal(count, np.full(t.shape, seen))
