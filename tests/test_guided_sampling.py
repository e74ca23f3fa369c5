"""Guided samplers (replacement inpainting and RePaint, SDEdit, DPS: solver wrappers) on Gaussian data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import difflax
from difflax import guidance as G
from difflax import solvers as S
from difflax.analytic import GaussianMixture
from tests.test_guidance import COV, KNOWN_MASK, KNOWN_VALUES, MEAN, VP, D, _check_conditional, _mixture


def test_replacement_inpainting_keeps_known_exactly_and_repaint():
    gm = GaussianMixture.full(MEAN[None], COV[None])
    n = 2000
    x_T = VP.prior_sample(jax.random.key(0), (n, D))
    known = jnp.asarray(KNOWN_VALUES, jnp.float32)

    @jax.jit
    def run(key):
        return S.inpaint_sample(gm.denoiser(VP), VP, x_T, known, KNOWN_MASK, key, solver="ddpm", steps=40,
                                return_trajectory=True)

    x, info = run(jax.random.key(1))
    known_part = np.broadcast_to(np.float32(KNOWN_VALUES[KNOWN_MASK]), (n, 4))
    np.testing.assert_array_equal(np.asarray(x)[:, KNOWN_MASK], known_part)
    traj, tt = np.asarray(info["trajectory"]), np.asarray(info["trajectory_t"])
    assert traj.shape == (41, n, D) and int(info["nfe"]) == 40
    np.testing.assert_array_equal(traj[-1], np.asarray(x))
    # After every step the known part is a FRESH draw of q(x_t | known): standardized residuals
    # are N(0, 1) and uncorrelated from one step to the next.
    alpha, sigma = (np.asarray(c)[:, None, None] for c in VP.alpha_sigma(jnp.asarray(tt[1:-1])))
    z = ((traj[1:-1] - alpha * KNOWN_VALUES) / sigma)[:, :, KNOWN_MASK]
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.01
    assert abs(np.mean(z[1:] * z[:-1])) < 0.01
    # Replacement is biased even for Gaussian data (the unknown part sees only a noisy copy of
    # the known one at high noise); on this smooth covariance the bias is small. Observed
    # (2000 samples): mean error 0.19, covariance error 0.06.
    _check_conditional(x, mean_tol=0.3, cov_tol=0.12)
    # RePaint resampling (j = 5, r = 5) harmonizes: observed mean error 0.05, covariance error 0.06.
    x_rp, info_rp = jax.jit(lambda k: S.inpaint_sample(gm.denoiser(VP), VP, x_T, known, KNOWN_MASK, k, steps=40,
                                                       jump_length=5, resample=5))(jax.random.key(1))
    assert int(info_rp["nfe"]) == len(info_rp["moves"]) - int(np.sum(np.diff(info_rp["moves"]) < 0)) + 1
    np.testing.assert_array_equal(np.asarray(x_rp)[:, KNOWN_MASK], np.asarray(x)[:, KNOWN_MASK])
    _check_conditional(x_rp, mean_tol=0.12, cov_tol=0.12)


def test_repaint_schedule():
    moves = np.array(S.repaint_moves(6, 2, 3))
    down = moves[:, 1] > moves[:, 0]
    assert np.all(np.abs(np.diff(moves, axis=1)[down]) == 1) and np.all(np.diff(moves, axis=1)[~down] == -2)
    assert moves[0, 0] == 0 and moves[-1, 1] == 6 and down.sum() == 6 + 2 * 2 * 2  # 2 jump points, 2 repeats each
    assert S.repaint_moves(5, 1, 1) == [(i, i + 1) for i in range(5)]


def test_dps_sampling_on_gaussian_data():
    gm = GaussianMixture.full(MEAN[None], COV[None])
    n = 2000
    x_T = VP.prior_sample(jax.random.key(0), (n, D))
    y = jnp.asarray(KNOWN_VALUES, jnp.float32)
    op = G.mask_operator(KNOWN_MASK)
    # DPS is an approximation (p(y | x_t) ~ p(y | x0_hat)): with zeta = 0.3 and 100 DDPM steps it
    # is observed at mean error 0.10 and covariance error 0.17 (it under-disperses).
    x_dps, info = jax.jit(lambda k: S.dps_sample(gm.denoiser(VP), VP, x_T, y, op, k, zeta=0.3, steps=100))(
        jax.random.key(1))
    assert int(info["nfe"]) == 100
    _check_conditional(x_dps, mean_tol=0.2, cov_tol=0.25)
    assert np.abs(np.asarray(x_dps)[:, KNOWN_MASK] - KNOWN_VALUES[KNOWN_MASK]).mean() < 0.2


def test_sdedit():
    gm = GaussianMixture.full(MEAN[None], COV[None])
    # SDEdit of exact data draws with the exact denoiser keeps the data distribution, and the
    # grid runs from t_start to t_min.
    n = 2000
    x0, _ = gm.sample(jax.random.key(1), n)
    out, info = jax.jit(lambda k: S.sdedit(gm.denoiser(VP), VP, x0, 0.3, k, solver="heun", steps=6))(
        jax.random.key(2))
    ts = np.asarray(info["ts"])
    assert ts.shape == (7,) and ts[0] == pytest.approx(0.3) and ts[-2] == pytest.approx(VP.t_min) and ts[-1] == 0
    out = np.asarray(out)  # observed: mean error 0.04, covariance error 0.05, correlation 0.71
    assert np.abs(out.mean(0) - MEAN).max() < 0.08 and np.abs(np.cov(out.T) - COV).max() < 0.1
    assert 0.5 < np.corrcoef(out[:, 2], np.asarray(x0)[:, 2])[0, 1] < 0.9  # edits, but stays close


def test_sampler_bad_input_raises_clear_errors():
    den = _mixture(1.2, 0.5).denoiser(VP)
    x = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match="mask"):
        S.inpaint_sample(den, VP, x, jnp.zeros(2), jnp.ones(3, bool), jax.random.key(0))
    with pytest.raises(ValueError, match="known"):
        S.inpaint_sample(den, VP, x, jnp.zeros(5), jnp.ones(2, bool), jax.random.key(0))
    with pytest.raises(ValueError, match="resample"):
        S.inpaint_sample(den, VP, x, jnp.zeros(2), jnp.ones(2, bool), jax.random.key(0), resample=0)
    with pytest.raises(ValueError, match="Unknown solver"):
        S.inpaint_sample(den, VP, x, jnp.zeros(2), jnp.ones(2, bool), jax.random.key(0), solver="rk45")
    with pytest.raises(ValueError, match=r"(?i)heun"):
        S.dps_sample(den, VP, x, x, lambda z: z, jax.random.key(0), solver="heun")
    with pytest.raises(ValueError, match="t_start"):
        S.sdedit(den, VP, x, 2.0, jax.random.key(0))


def test_wrapper_runs_in_sample_and_jumps_renoise_with_the_forward_transition():
    gm = GaussianMixture.full(MEAN[None], COV[None])
    denoise = gm.denoiser(VP)
    x_T = VP.prior_sample(jax.random.key(0), (64, D))
    known = jnp.broadcast_to(jnp.asarray(KNOWN_VALUES, jnp.float32), x_T.shape)
    mask = jnp.broadcast_to(jnp.asarray(KNOWN_MASK), x_T.shape)
    # The wrapper is an ordinary solver: difflax.sample runs it, and inpaint_sample is that call.
    wrapped = S.ReplaceKnown(S.DDPM(), known, mask)
    a, info_a = difflax.sample(denoise, VP, x_T, solver=wrapped, steps=12, key=jax.random.key(3))
    b, info_b = S.inpaint_sample(denoise, VP, x_T, known, KNOWN_MASK, jax.random.key(3), steps=12)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(info_a["nfe"]) == int(info_b["nfe"]) == 12
    # A move up in time draws q(x_s | x_t): alpha_s / alpha_t x_t + sigma_s sqrt(1 - e^{-2h}) z. From a
    # point mass at t the moments are exact; the solver never runs (0 evaluations before the final step).
    ts = jnp.asarray([0.5, 0.2])
    x = jnp.ones((20000, 1))
    out, info = S.run(S.DDIM(), lambda x, t: jnp.full_like(x, jnp.nan), VP, x, ts, final_zero=False,
                      key=jax.random.key(4), moves=[(1, 0)])
    alpha_s, sigma_s = (float(v) for v in VP.alpha_sigma(0.5))
    alpha_t, sigma_t = (float(v) for v in VP.alpha_sigma(0.2))
    ratio = alpha_s / alpha_t
    assert int(info["nfe"]) == 0
    assert abs(float(out.mean()) - ratio) < 4 * sigma_s / np.sqrt(20000)
    assert abs(float(out.var()) - (sigma_s**2 - ratio**2 * sigma_t**2)) < 0.03 * sigma_s**2
