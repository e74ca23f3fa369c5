"""Guidance transforms against exact answers on Gaussian mixtures (exact p(x_t | y) and p(y | x_t)).

Sampling tests use few steps and ~2000 samples; each jitted sampler is compiled once.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import difflax
from difflax import guidance as G
from difflax.analytic import GaussianMixture
from difflax.losses import drop_condition, noisy_classifier_loss

VP = difflax.VP()
NULL = 3  # null label id of the 3-class mixtures below
ANGLES = np.deg2rad([90, 210, 330, 30, 150, 270])


def _mixture(radius, std, dtype=jnp.float32):
    """6 components on a circle, 2 per class, classes 0, 1, 2."""
    means = jnp.asarray(radius * np.stack([np.cos(ANGLES), np.sin(ANGLES)], 1), dtype)
    return GaussianMixture.isotropic(means, std, labels=[0, 1, 2, 0, 1, 2])


def _cond_denoiser(gm, process, calls=None):
    """Exact ``D(x, t, y)``: class-conditional for y < NULL, unconditional for y == NULL."""

    def denoise(x, t, y):
        if calls is not None:
            calls.append((x.shape, t.shape, jax.tree.map(jnp.shape, y)))
        alpha, sigma = process.alpha_sigma(t)
        is_null = y == NULL
        cond = gm.posterior_mean(x, alpha, sigma, y=jnp.where(is_null, 0, y))
        return jnp.where(is_null[:, None], gm.posterior_mean(x, alpha, sigma), cond)

    return denoise


def _points(rng, n=6, scale=2.0):
    x = jnp.asarray(rng.normal(size=(n, 2)) * scale)
    t = jnp.asarray(np.linspace(0.03, 0.9, n))
    y = jnp.asarray(np.arange(n) % 3)
    return x, t, y


@jax.jit
def _posterior_stats(gm, x, y):
    post = gm.class_posterior(x, *VP.alpha_sigma(jnp.asarray(VP.t_min)))
    return post[jnp.arange(len(y)), y].mean(), (post.argmax(-1) == y).mean()


def _confidence(gm, x, y):
    """Exact class posterior of the samples at t_min: (mean confidence in y, accuracy of argmax)."""
    return tuple(float(v) for v in _posterior_stats(gm, x, y))


def _diversity(x, y):
    """Mean over classes of the trace of the samples' covariance."""
    x, y = np.asarray(x), np.asarray(y)
    return float(np.mean([np.trace(np.cov(x[y == c].T)) for c in range(3)]))


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance: exactness, conventions, one batched call.


def test_cfg_scale_one_is_conditional_and_conventions_agree(x64):
    gm = _mixture(1.2, 0.5, jnp.float64)
    calls = []
    dc = _cond_denoiser(gm, VP, calls)
    x, t, y = _points(np.random.default_rng(0))
    per_example_scale = jnp.array([1.0, 2.0, 3.0, 1.0, 2.0, 3.0])

    @jax.jit
    def compute():
        out = {"gamma1": G.cfg(dc, y, 1.0, null=NULL)(x, t)}
        out["w0"] = G.cfg(dc, y, 0.0, null=NULL, convention="w")(x, t)
        out["gamma0"] = G.cfg(dc, y, 0.0, null=NULL)(x, t)
        for w in (0.5, 3.0):
            out[f"w{w}"] = G.cfg(dc, y, w, null=NULL, convention="w")(x, t)
            out[f"gamma{1 + w}"] = G.cfg(dc, y, 1.0 + w, null=NULL)(x, t)
        out["per_example"] = G.cfg(dc, y, per_example_scale, null=NULL)(x, t)
        out["gamma2"] = G.cfg(dc, y, 2.0, null=NULL)(x, t)
        out["scalars"] = G.cfg(dc, 2, 1.0, null=NULL)(x, 0.3)  # a scalar label and a scalar t broadcast
        return out

    out = compute()
    want = gm.posterior_mean(x, *VP.alpha_sigma(t), y=y)
    np.testing.assert_allclose(out["gamma1"], want, atol=1e-10)
    # ONE call with the batch doubled: [x, x], [t, t], [y, null].
    assert calls[0] == ((12, 2), (12,), (12,)) and all(c[0] == (12, 2) for c in calls)
    assert len(calls) == 10  # one per guided evaluation
    np.testing.assert_allclose(out["w0"], want, atol=1e-10)
    # gamma = 1 + w, and gamma = 0 is the unconditional model.
    for w in (0.5, 3.0):
        np.testing.assert_allclose(out[f"w{w}"], out[f"gamma{1 + w}"], atol=1e-12)
    np.testing.assert_allclose(out["gamma0"], gm.posterior_mean(x, *VP.alpha_sigma(t)), atol=1e-10)
    np.testing.assert_allclose(out["per_example"][1], out["gamma2"][1], atol=1e-12)
    np.testing.assert_allclose(out["per_example"][0], out["gamma1"][0], atol=1e-12)
    np.testing.assert_allclose(out["scalars"], gm.posterior_mean(x, *VP.alpha_sigma(0.3), y=2), atol=1e-10)


def test_cfg_null_embedding_and_linearity_in_every_space(x64):
    gm = _mixture(1.2, 0.5, jnp.float64)
    dc = _cond_denoiser(gm, VP)

    def d_emb(x, t, emb):  # conditions are one-hot embeddings; the null embedding is zeros
        label = jnp.where(emb.sum(-1) == 0, NULL, emb.argmax(-1))
        return dc(x, t, label)

    x, t, y = _points(np.random.default_rng(1))
    emb = jax.nn.one_hot(y, 3, dtype=jnp.float64)
    gamma = 2.5

    @jax.jit
    def compute():
        return (G.cfg(d_emb, emb, gamma, null=jnp.zeros(3))(x, t), G.cfg(dc, y, gamma, null=NULL)(x, t),
                dc(x, t, y), dc(x, t, jnp.full_like(y, NULL)))

    d_emb_g, d_g, d_c, d_u = compute()
    np.testing.assert_allclose(d_emb_g, d_g, atol=1e-12)
    # The rule is affine with weights summing to 1: the same in eps, v and score space.
    alpha, sigma = (c[:, None] for c in VP.alpha_sigma(t))
    for space in ("eps", "v", "score"):
        conv = lambda d, s=space: difflax.convert(d, "x0", s, x, alpha, sigma)
        np.testing.assert_allclose(conv(d_g), conv(d_u) + gamma * (conv(d_c) - conv(d_u)), rtol=1e-9, atol=1e-9)
    assert G.null_like(NULL, y).dtype == y.dtype and G.null_like(jnp.zeros(3), emb).shape == emb.shape


def test_rescale_interval_apg_compose_and_separate(x64):
    gm = _mixture(1.2, 0.5, jnp.float64)
    calls = []
    dc = _cond_denoiser(gm, VP, calls)
    x, t, y = _points(np.random.default_rng(2))
    y2 = (y + 1) % 3
    alpha, sigma = (c[:, None] for c in VP.alpha_sigma(t))
    level = np.asarray(sigma[:, 0] / alpha[:, 0])  # EDM sigma = sigma / alpha
    srt = np.sort(level)
    lo, hi = float(srt[1:3].mean()), float(srt[4:6].mean())  # examples 3 to 5 (sorted) inside
    inside = (level > lo) & (level <= hi)
    t_out = jnp.full((6,), 0.02)  # every example below the interval

    @jax.jit
    def compute():
        d_c, d_u = gm.posterior_mean(x, *VP.alpha_sigma(t), y=y), gm.posterior_mean(x, *VP.alpha_sigma(t))
        out = {"plain": G.cfg(dc, y, 4.0, null=NULL)(x, t), "d_c": d_c, "d_u": d_u}
        for space in G.RESCALE_SPACES:
            out[space] = G.cfg(dc, y, 4.0, null=NULL, process=VP, rescale=0.0, rescale_space=space)(x, t)
        out["rescaled"] = G.cfg(dc, y, 4.0, null=NULL, process=VP, rescale=1.0, rescale_space="v")(x, t)
        out["interval"] = G.cfg(dc, y, 4.0, null=NULL, process=VP, interval=(lo, hi))(x, t)
        out["apg1"] = G.apg(dc, y, 4.0, null=NULL, eta=1.0)(x, t)
        out["apg0"] = G.apg(dc, y, 4.0, null=NULL, eta=0.0)(x, t)
        out["capped"] = G.apg(dc, y, 4.0, null=NULL, eta=1.0, norm_threshold=0.01)(x, t)
        out["g1"], buf = G.apg_update(d_c, d_u, 4.0, eta=1.0, momentum=-0.5)
        out["g2"], out["buf2"] = G.apg_update(d_c, d_u, 4.0, eta=1.0, momentum=-0.5, buffer=buf)
        out["compose1"] = G.compose(dc, [y], [4.0], null=NULL)(x, t)
        out["separate"] = G.cfg_separate(gm.denoiser(VP, y=y), gm.denoiser(VP), 4.0)(x, t)
        out["d_c2"] = gm.posterior_mean(x, *VP.alpha_sigma(t), y=y2)
        calls.clear()
        out["compose2"] = G.compose(dc, [y, y2], jnp.array([2.0, 1.5]), null=NULL)(x, t)
        out["compose_calls"] = list(calls)
        calls.clear()
        out["outside"] = G.cfg(dc, y, 4.0, null=NULL, process=VP, interval=(lo, hi))(x, t_out)
        out["outside_calls"] = list(calls)
        out["cond_out"] = gm.posterior_mean(x, *VP.alpha_sigma(t_out), y=y)
        return {k: v for k, v in out.items() if not k.endswith("calls")}, out["compose_calls"], out["outside_calls"]

    out, compose_calls, outside_calls = compute()
    plain, d_c, d_u = out["plain"], out["d_c"], out["d_u"]
    # CFG rescale: phi = 0 is plain CFG; phi = 1 matches the conditional std in its space.
    for space in G.RESCALE_SPACES:
        np.testing.assert_allclose(out[space], plain, atol=1e-12)
    to_v = lambda d: difflax.convert(d, "x0", "v", x, alpha, sigma)
    np.testing.assert_allclose(jnp.std(to_v(out["rescaled"]), axis=1), jnp.std(to_v(d_c), axis=1), rtol=1e-10)
    # Interval: guided inside (sigma_lo, sigma_hi], the conditional denoiser outside.
    np.testing.assert_allclose(out["interval"][inside], plain[inside], atol=1e-12)
    np.testing.assert_allclose(out["interval"][~inside], d_c[~inside], atol=1e-12)
    np.testing.assert_allclose(out["outside"], out["cond_out"], atol=1e-12)
    assert [c[0] for c in outside_calls] == [(12, 2), (6, 2)]  # lax.cond: both branches traced once
    # APG: eta = 1 without threshold is CFG; eta = 0 keeps only the part orthogonal to D_c.
    np.testing.assert_allclose(out["apg1"], plain, atol=1e-12)
    np.testing.assert_allclose(jnp.sum((out["apg0"] - d_c) * d_c, axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(jnp.linalg.norm((out["capped"] - d_c) / 3.0, axis=1), 0.01, rtol=1e-9)
    np.testing.assert_allclose(out["g1"], plain, atol=1e-12)  # momentum: buffer = Delta + beta buffer
    np.testing.assert_allclose(out["g2"], d_c + 3.0 * 0.5 * (d_c - d_u), atol=1e-12)
    np.testing.assert_allclose(out["buf2"], 0.5 * (d_c - d_u), atol=1e-12)
    # Composition: one call of batch (n + 1) B; one condition with weight gamma is CFG.
    assert [c[0] for c in compose_calls] == [(18, 2)]
    np.testing.assert_allclose(out["compose2"], d_u + 2.0 * (d_c - d_u) + 1.5 * (out["d_c2"] - d_u), atol=1e-12)
    np.testing.assert_allclose(out["compose1"], plain, atol=1e-12)
    np.testing.assert_allclose(out["separate"], plain, atol=1e-12)  # two separate denoisers


def test_thresholding():
    x = jnp.array([[0.5, -0.9, 0.2, 1.0], [3.0, -0.5, 0.1, 0.2], [-4.0, 2.0, 0.1, 0.0]])
    ident = lambda x, t: x
    out = G.dynamic_threshold(ident, percentile=0.75)(x, 0.5)
    assert np.all(np.abs(np.asarray(out)) <= 1.0 + 1e-7)
    np.testing.assert_array_equal(out[0], x[0])  # in range: unchanged (s = 1)
    s = np.quantile(np.abs(np.asarray(x[2])), 0.75)  # per example s = max(percentile, 1)
    np.testing.assert_allclose(out[2], np.clip(np.asarray(x[2]), -s, s) / s, rtol=1e-6)
    np.testing.assert_array_equal(G.clip_x0(ident)(x, 0.5), jnp.clip(x, -1.0, 1.0))


# ----------------------------------------------------------------------------------------------
# Classifier guidance.


def test_classifier_guidance_with_exact_posterior_is_conditional(x64):
    gm = _mixture(1.2, 0.5, jnp.float64)
    x, t, y = _points(np.random.default_rng(3))
    cases = [(VP, t), (difflax.EDM(), 5.0 * t)]

    @jax.jit
    def compute():
        out = {}
        for i, (process, tt) in enumerate(cases):

            def log_prob(z, tq, process=process):
                return gm.class_log_posterior(z, *process.alpha_sigma(tq))[jnp.arange(6), y]

            den = gm.denoiser(process)
            for form in G.FORMS:
                for s in (1.0, 3.0):
                    out[i, form, s] = G.classifier_guidance(den, process, log_prob, s, form=form)(x, tt)
        return out

    out = compute()
    for i, (process, tt) in enumerate(cases):
        alpha, sigma = process.alpha_sigma(tt)
        # the score of p(x_t) p(y | x_t)^s: s = 1 is the exact conditional denoiser
        score = gm.score(x, alpha, sigma) + 3.0 * (gm.score(x, alpha, sigma, y=y) - gm.score(x, alpha, sigma))
        want3 = (x + sigma[:, None] ** 2 * score) / alpha[:, None]
        for form in G.FORMS:
            np.testing.assert_allclose(out[i, form, 1.0], gm.posterior_mean(x, alpha, sigma, y=y), atol=1e-8)
            np.testing.assert_allclose(out[i, form, 3.0], want3, atol=1e-8)


def test_classifier_guidance_sampling_gives_the_class():
    gm = _mixture(2.5, 0.4)
    n = 2000
    y = jnp.arange(n) % 3

    def log_prob(z, t):
        return gm.class_log_posterior(z, *VP.alpha_sigma(t))[jnp.arange(n), y]

    x_T = VP.prior_sample(jax.random.key(0), (n, 2))
    guided = G.classifier_guidance(gm.denoiser(VP), VP, log_prob, 1.0)
    # 100 steps: at 40 the ancestral sampler's own discretization error shrinks the spread by ~8%.
    x, _ = jax.jit(lambda k: difflax.sample(guided, VP, x_T, solver="ddpm", steps=100, key=k))(jax.random.key(1))
    _, acc = _confidence(gm, x, y)
    assert acc >= 0.99, acc
    # and each class keeps its exact spread: two components of std 0.4 with equal weights
    means = np.asarray(gm.means)[[0, 3]]  # class 0's components (all classes are rotations)
    assert _diversity(x, y) == pytest.approx(2 * 0.4**2 + np.var(means, axis=0).sum(), rel=0.1)


def test_raising_the_scale_sharpens_and_does_not_recompile():
    gm = _mixture(1.2, 0.5)
    dc = _cond_denoiser(gm, VP)
    n = 2000
    y = jnp.arange(n) % 3
    x_T = VP.prior_sample(jax.random.key(0), (n, 2))
    traces = []

    @jax.jit
    def run(scale, key):
        traces.append(1)
        return difflax.sample(G.cfg(dc, y, scale, null=NULL), VP, x_T, solver="ddpm", steps=25, key=key)[0]

    stats = []
    for scale in (1.0, 2.0, 4.0, 8.0):
        x = run(scale, jax.random.key(1))  # the same noise for every scale
        stats.append((*_confidence(gm, x, y), _diversity(x, y)))
    assert len(traces) == 1  # the scale is traced: no recompilation
    conf, _, div = map(np.array, zip(*stats, strict=True))
    assert np.all(np.diff(conf) > 0) and conf[-1] > 0.98, conf
    assert np.all(np.diff(div) < 0), div
    assert 0.8 < conf[0] < 0.92  # scale 1 is the conditional model: its exact confidence is ~0.87


def test_trained_noisy_classifier_guides_samples_to_the_class():
    gm = _mixture(1.5, 0.4)
    sizes = [3, 32, 32, 3]
    keys = jax.random.split(jax.random.key(0), len(sizes))
    params = [
        (jax.random.normal(k, (i, o)) / np.sqrt(i), jnp.zeros(o))
        for k, i, o in zip(keys, sizes[:-1], sizes[1:], strict=False)
    ]

    def logits_fn(params, x, t):
        h = jnp.concatenate([x, jnp.broadcast_to(jnp.asarray(t), x.shape[:1])[:, None]], -1)
        for w, b in params[:-1]:
            h = jax.nn.silu(h @ w + b)
        w, b = params[-1]
        return h @ w + b

    opt = optax.adam(1e-2)

    @jax.jit
    def train(params, key):
        def step(carry, k):
            params, state = carry
            k1, k2, k3 = jax.random.split(k, 3)
            x0, comp = gm.sample(k1, 128)
            labels = gm.labels[comp]
            t = jax.random.uniform(k2, (128,), minval=VP.t_min, maxval=VP.t_max)
            eps = jax.random.normal(k3, x0.shape)
            loss_fn = lambda p: noisy_classifier_loss(
                lambda x, tt: logits_fn(p, x, tt), VP, x0, labels, t, eps).mean()
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, state = opt.update(grads, state)
            return (optax.apply_updates(params, updates), state), loss

        (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), jax.random.split(key, 200))
        return params, losses

    params, losses = train(params, jax.random.key(1))
    assert float(losses[-50:].mean()) < float(losses[:10].mean())
    n = 2000
    y = jnp.arange(n) % 3
    x_T = VP.prior_sample(jax.random.key(2), (n, 2))
    log_prob = G.classifier_log_prob(lambda x, t: logits_fn(params, x, t), y)

    @jax.jit
    def run(scale, key):
        return difflax.sample(G.classifier_guidance(gm.denoiser(VP), VP, log_prob, scale), VP, x_T, solver="ddpm",
                              steps=25, key=key)[0]

    _, acc_unguided = _confidence(gm, run(0.0, jax.random.key(3)), y)
    _, acc_guided = _confidence(gm, run(3.0, jax.random.key(3)), y)
    assert acc_unguided < 0.45 and acc_guided > 0.95, (acc_unguided, acc_guided)


def test_universal_guidance_uses_the_denoiser_gradient(x64):
    gm = _mixture(1.2, 0.5, jnp.float64)
    x, t, y = _points(np.random.default_rng(4))

    def log_prob_x0(x0):  # a clean-data "classifier": the exact class posterior at t = 0
        return gm.class_log_posterior(x0, 1.0, 1e-3)[jnp.arange(6), y]

    den = gm.denoiser(VP)

    @jax.jit
    def compute():
        grad = jax.grad(lambda z: jnp.sum(log_prob_x0(den(z, t))))(x)  # J^T grad log p(y | x0_hat)
        return (G.universal_guidance(den, VP, log_prob_x0, 2.0)(x, t),
                G.universal_guidance(den, VP, log_prob_x0, 2.0, form="eps")(x, t), den(x, t), grad)

    got, got_eps, x0_hat, grad = compute()
    alpha, sigma = (c[:, None] for c in VP.alpha_sigma(t))
    np.testing.assert_allclose(got, x0_hat + 2.0 * sigma**2 / alpha * grad, atol=1e-10)
    np.testing.assert_allclose(got_eps, got, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Inpainting and linear inverse problems on Gaussian data.

D = 6
_GRID = np.arange(D)
COV = np.exp(-0.5 * (_GRID[:, None] - _GRID[None]) ** 2) + 0.01 * np.eye(D)  # a smooth 1-D "image"
MEAN = 0.3 * np.sin(_GRID)
KNOWN_MASK = np.array([1, 1, 0, 0, 1, 1], bool)
KNOWN_VALUES = np.array([0.8, 1.2, 0.0, 0.0, -1.0, -0.4])  # zeros off the mask


def _exact_conditional():
    k, u = KNOWN_MASK, ~KNOWN_MASK
    gain = COV[np.ix_(u, k)] @ np.linalg.inv(COV[np.ix_(k, k)])
    mean = MEAN[u] + gain @ (KNOWN_VALUES[k] - MEAN[k])
    return mean, COV[np.ix_(u, u)] - gain @ COV[np.ix_(k, u)]


def _check_conditional(x, mean_tol, cov_tol):
    mean, cov = _exact_conditional()
    u = np.asarray(x)[:, ~KNOWN_MASK]
    assert np.abs(u.mean(0) - mean).max() < mean_tol, (u.mean(0), mean)
    assert np.abs(np.cov(u.T) - cov).max() < cov_tol, (np.cov(u.T), cov)


def test_exact_guidance_for_linear_inverse_problems(x64):
    """Pi-GDM is exact for isotropic Gaussian data, its Tweedie-covariance variant for any Gaussian."""
    rng = np.random.default_rng(5)
    shape, d = (4, 4, 1), 16
    v = 0.7
    mu = rng.normal(size=d) * 0.3
    iso = GaussianMixture.isotropic(mu[None], np.sqrt(v), event_shape=shape)
    a = rng.normal(size=(d, d))
    cov_full = a @ a.T / d + 0.1 * np.eye(d)
    full = GaussianMixture.full(mu[None], cov_full[None], event_shape=shape)
    x = jnp.asarray(rng.normal(size=(3, *shape)))
    t = jnp.asarray([0.05, 0.3, 0.8])
    mask = jnp.asarray(rng.uniform(size=shape) < 0.5)
    kernel = jnp.asarray([[0.05, 0.1, 0.05], [0.1, 0.4, 0.1], [0.05, 0.1, 0.05]])
    ops = {"mask": G.mask_operator(mask), "superres": G.superres_operator(2), "blur": G.blur_operator(kernel)}

    def matrix(fn):
        return np.asarray(jax.vmap(lambda e: fn(e.reshape(1, *shape)).ravel())(jnp.eye(d))).T

    def exact(cov, a_mat, y, sigma_y):
        """E[x0 | x_t, y] by Gaussian conditioning on (x_t, y) (pseudo-inverse for the noiseless mask)."""
        out = []
        for xi, ti in zip(np.asarray(x).reshape(3, d), np.asarray(t), strict=True):
            al, si = (float(c) for c in VP.alpha_sigma(ti))
            m = a_mat.shape[0]
            szz = np.block([[al**2 * cov + si**2 * np.eye(d), al * cov @ a_mat.T],
                            [al * a_mat @ cov, a_mat @ cov @ a_mat.T + sigma_y**2 * np.eye(m)]])
            sxz = np.hstack([al * cov, cov @ a_mat.T])
            out.append(mu + sxz @ np.linalg.pinv(szz, rcond=1e-12) @ np.r_[xi - al * mu, y - a_mat @ mu])
        return np.array(out)

    cases = [  # (operator, sigma_y, covariance): the noiseless mask uses A^+, the others the Gram solve
        ("mask", 0.0, "isotropic"), ("superres", 0.2, "isotropic"), ("blur", 0.1, "isotropic"),
        ("mask", 0.0, "tweedie"), ("blur", 0.1, "tweedie"), ("superres_fn", 0.2, "isotropic"),
    ]
    ops["superres_fn"] = ops["superres"].forward  # a plain function: A^T by linear_transpose, CG solve
    ys = {name: ops[name.removesuffix("_fn")].forward(jnp.asarray(rng.normal(size=(1, *shape)))) for name in ops}
    ys["superres_fn"] = ys["superres"]

    @jax.jit
    def compute():
        out = []
        for name, sigma_y, covariance in cases:
            gm, kwargs = (iso, {"data_var": v}) if covariance == "isotropic" else (full, {})
            guided = G.pigdm(gm.denoiser(VP), VP, ys[name], ops[name], sigma_y=sigma_y, covariance=covariance,
                             cg_tol=1e-13, **kwargs)
            out.append(guided(x, t))
        return out

    for (name, sigma_y, covariance), got in zip(cases, compute(), strict=True):
        cov = v * np.eye(d) if covariance == "isotropic" else cov_full
        a_mat = matrix(ops[name.removesuffix("_fn")].forward)
        want = exact(cov, a_mat, np.asarray(ys[name]).ravel(), sigma_y)
        np.testing.assert_allclose(np.asarray(got).reshape(3, d), want, atol=1e-8, err_msg=f"{name} {covariance}")


def test_operators_adjoints_and_pseudoinverses(x64):
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(2, 8, 6, 3)))
    kernel = jnp.asarray(rng.uniform(size=(3, 5)))
    ops = (G.mask_operator(rng.uniform(size=(8, 6, 3)) < 0.3), G.superres_operator(2), G.blur_operator(kernel))

    @jax.jit
    def compute():
        out = []
        for op in ops:
            ax = op.forward(x)
            y = jax.random.normal(jax.random.key(0), ax.shape, ax.dtype)
            out.append((jnp.vdot(ax, y), jnp.vdot(x, op.transpose(y)), op.forward(op.pinv(ax)), ax))
        return out, ops[2].forward(x), ops[1].forward(x)

    out, blurred, pooled = compute()
    for ax_y, x_aty, a_pinv_ax, ax in out:
        np.testing.assert_allclose(ax_y, x_aty, rtol=1e-10)  # <A x, y> = <x, A^T y>
        np.testing.assert_allclose(a_pinv_ax, ax, atol=1e-8)  # A A^+ A = A
    # circular convolution with a kernel centred at (1, 2); 2 x 2 average pooling
    xs, ks = np.asarray(x), np.asarray(kernel)
    want = sum(ks[i, j] * np.roll(xs, (i - 1, j - 2), axis=(1, 2)) for i in range(3) for j in range(5))
    np.testing.assert_allclose(blurred, want, atol=1e-10)
    np.testing.assert_allclose(pooled, xs.reshape(2, 4, 2, 3, 2, 3).mean((2, 4)), rtol=1e-12)


def test_inverse_problem_sampling_on_gaussian_data():
    gm = GaussianMixture.full(MEAN[None], COV[None])
    n = 2000
    x_T = VP.prior_sample(jax.random.key(0), (n, D))
    y = jnp.asarray(KNOWN_VALUES, jnp.float32)
    op = G.mask_operator(KNOWN_MASK)
    # Tweedie-covariance guidance is exact for Gaussian data: only Monte Carlo and
    # discretization error remain (observed: mean 0.02, covariance 0.01).
    guided = G.pigdm(gm.denoiser(VP), VP, y, op, covariance="tweedie")
    x, _ = jax.jit(lambda: difflax.sample(guided, VP, x_T, solver="heun", steps=10))()
    _check_conditional(x, mean_tol=0.06, cov_tol=0.05)
    np.testing.assert_allclose(np.asarray(x)[:, KNOWN_MASK], np.broadcast_to(KNOWN_VALUES[KNOWN_MASK], (n, 4)),
                               atol=1e-3)


def test_inpaint_denoiser_transform(key):
    gm = GaussianMixture.full(MEAN[None], COV[None])
    known = jnp.asarray(KNOWN_VALUES, jnp.float32)
    den = jax.jit(G.inpaint(gm.denoiser(VP), known, KNOWN_MASK))
    x = jax.random.normal(key, (5, D))
    np.testing.assert_array_equal(np.asarray(den(x, jnp.full((5,), 0.5)))[:, KNOWN_MASK],
                                  np.broadcast_to(np.float32(KNOWN_VALUES[KNOWN_MASK]), (5, 4)))


# ----------------------------------------------------------------------------------------------
# Training support and errors.


def test_drop_condition_and_noisy_classifier_loss(key):
    y = jnp.arange(4000) % 3
    emb = {"text": jnp.ones((4000, 2, 3)), "pooled": jnp.ones((4000, 5))}
    null = {"text": jnp.zeros((2, 3)), "pooled": jnp.zeros(5)}
    x0 = jax.random.normal(key, (5, 2))
    eps = jax.random.normal(jax.random.key(1), (5, 2))
    t = jnp.linspace(0.1, 0.9, 5)
    labels = jnp.array([0, 1, 2, 0, 1])
    w = jnp.arange(6.0).reshape(2, 3)
    logits_fn = lambda x, t: x @ w + t[:, None]

    @jax.jit
    def compute(key):
        out, dropped = drop_condition(key, y, 0.2, NULL, return_mask=True)
        x_t = VP.marginal(x0, t, eps)
        return (out, dropped, drop_condition(key, emb, 0.2, null),
                -jax.nn.log_softmax(logits_fn(x_t, t))[jnp.arange(5), labels],
                noisy_classifier_loss(logits_fn, VP, x0, labels, t, eps),
                noisy_classifier_loss(logits_fn, VP, x0, jax.nn.one_hot(labels, 3), t, eps))

    out, dropped, out_emb, want, loss, loss_soft = compute(key)
    assert abs(float(dropped.mean()) - 0.2) < 0.03
    np.testing.assert_array_equal(out, jnp.where(dropped, NULL, y))
    np.testing.assert_array_equal(out_emb["text"].sum((1, 2)) == 0, dropped)  # same key: same examples
    np.testing.assert_array_equal(out_emb["pooled"].sum(1) == 0, dropped)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(loss_soft, want, rtol=1e-6)


def test_bad_input_raises_clear_errors():
    gm = _mixture(1.2, 0.5)
    dc = _cond_denoiser(gm, VP)
    den = gm.denoiser(VP)
    x, t = jnp.zeros((4, 2)), jnp.full((4,), 0.5)
    y = jnp.zeros(4, jnp.int32)
    with pytest.raises(ValueError, match="convention"):
        G.cfg(dc, y, 2.0, null=NULL, convention="omega")
    with pytest.raises(ValueError, match="form"):
        G.classifier_guidance(den, VP, lambda x, t: x.sum(-1), 1.0, form="logits")
    with pytest.raises(ValueError, match="rescale_space"):
        G.cfg(dc, y, 2.0, null=NULL, rescale=0.7, rescale_space="score")
    with pytest.raises(ValueError, match="process"):
        G.cfg(dc, y, 2.0, null=NULL, interval=(0.3, 5.0))
    with pytest.raises(ValueError, match="interval"):
        G.cfg(dc, y, 2.0, null=NULL, process=VP, interval=(5.0, 0.3))
    with pytest.raises(ValueError, match=r"^y: "):
        G.cfg(dc, jnp.zeros(3, jnp.int32), 2.0, null=NULL)(x, t)
    with pytest.raises(ValueError, match="null"):
        G.cfg(dc, y, 2.0, null=jnp.zeros(7))(x, t)
    with pytest.raises(ValueError, match="mask"):
        G.inpaint(den, jnp.zeros(2), jnp.ones((3, 2)))(x, t)
    with pytest.raises(ValueError, match="known"):
        G.inpaint(den, jnp.zeros(5), jnp.ones(2, bool))(x, t)
    with pytest.raises(ValueError, match="pinv"):
        G.pigdm(den, VP, x, lambda z: z)
    with pytest.raises(ValueError, match="covariance"):
        G.pigdm(den, VP, x, G.mask_operator(jnp.ones(2, bool)), covariance="diagonal")
    with pytest.raises(ValueError, match="percentile"):
        G.dynamic_threshold(den, percentile=99.5)
    with pytest.raises(ValueError, match="weights"):
        G.compose(dc, [y, y], [1.0], null=NULL)
    with pytest.raises(ValueError, match="factor"):
        G.superres_operator(3).forward(jnp.zeros((1, 4, 4, 1)))
    with pytest.raises(ValueError, match="p_uncond"):
        drop_condition(jax.random.key(0), y, 1.5, NULL)
