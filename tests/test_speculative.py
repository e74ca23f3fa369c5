"""Speculative sampling gives exact samples of the target's ancestral sampler, in fewer target calls.

Data: the 2-D mixture of three isotropic Gaussians of the stochastic-sampler tests
(unequal weights and widths) under the VP process, in float64; its exact denoiser is the
target. Drafts (``K = 4``):

* ``GOOD``: the exact denoiser of a mixture with means moved by ~0.07 and widths and
  weights changed by a few percent (a good student): 8 target calls for 20 steps (measured);
* ``BAD``: the exact denoiser of three overlapping modes in the wrong places with the
  wrong weights (its own ancestral sampler puts 72% of its samples on the target's
  second mode, which holds 30%): 77% of the proposals accepted;
* ``"frozen"``: the target's last verified ``x0`` held fixed: 10 target calls.

``N = 20000`` samples of each sampler are compared with the plain ancestral sampler (``difflax.sample(...,
solver="ddpm")``, the same chain) on the same 20-step grid with :func:`_two_sample_pvalues`:
Kolmogorov-Smirnov tests of both coordinates and both diagonals, and a chi-square test
of the class proportions (most probable component under the exact posterior). The
samples pass when the smallest p-value exceeds 1% / 5 (Bonferroni: the family is a test
at the 1% level). The same test rejects the draft's own sampler and a sampler whose
rejection step uses the synchronous instead of the reflection coupling, so it can fail.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import difflax.solvers.speculative as speculative_module
from difflax import VP, analytic, sample
from difflax.processes import broadcast_to
from difflax.solvers import reflection_coupling, speculative_sample

MEANS = [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]]
STDS = [0.3, 0.5, 0.4]
WEIGHTS = [0.5, 0.3, 0.2]
GOOD = ([[-2.05, 0.05], [1.95, -0.05], [0.05, 2.45]], [0.32, 0.47, 0.4], [0.47, 0.32, 0.21])
BAD = ([[-1.0, 1.0], [1.0, -1.0], [0.0, 0.0]], [0.6, 0.6, 0.6], [0.2, 0.3, 0.5])
N = 20_000
STEPS = 20
K = 4
LEVEL = 0.01
PROCESS = VP()


def _mixture(means=MEANS, stds=STDS, weights=WEIGHTS, labels=None):
    dtype = jnp.result_type(float)  # float64 under the x64 fixture
    means, stds = jnp.asarray(means, dtype), jnp.asarray(stds, dtype)
    return analytic.GaussianMixture.isotropic(means, stds, weights=weights, labels=labels)


def _classes(x):
    return np.asarray(_mixture().component_posterior(jnp.asarray(x), 1.0, 0.0)).argmax(-1)


def _two_sample_pvalues(x, y):
    """p-values of KS tests on four projections and of a chi-square test of the class counts."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert np.all(np.isfinite(x)) and np.all(np.isfinite(y))
    out = {}
    for name, d in (("x", (1, 0)), ("y", (0, 1)), ("x+y", (1, 1)), ("x-y", (1, -1))):
        d = np.asarray(d, np.float64) / np.linalg.norm(d)
        out[f"ks {name}"] = scipy.stats.ks_2samp(x @ d, y @ d).pvalue
    table = np.stack([np.bincount(_classes(x), minlength=3), np.bincount(_classes(y), minlength=3)])
    out["chi2 classes"] = scipy.stats.chi2_contingency(table).pvalue
    return out


def _same_distribution(x, y):
    p = _two_sample_pvalues(x, y)
    return min(p.values()) > LEVEL / len(p), p


# Jitted once per module: mixtures are pytree arguments, so drafts share one compilation.
_spec = jax.jit(
    lambda target, draft, x, key: speculative_sample(
        target.denoiser(PROCESS), draft.denoiser(PROCESS), PROCESS, x, key, steps=STEPS, K=K
    )
)
_frozen = jax.jit(
    lambda target, x, key: speculative_sample(target.denoiser(PROCESS), "frozen", PROCESS, x, key, steps=STEPS, K=K)
)
_plain = jax.jit(lambda gm, x, key: sample(gm.denoiser(PROCESS), PROCESS, x, solver="ddpm", steps=STEPS, key=key))


@pytest.fixture(scope="module")
def reference():
    """Plain ancestral samples of the target (float64) and the shared starting noise."""
    with jax.enable_x64(True):
        x_T = PROCESS.prior_sample(jax.random.key(0), (N, 2), jnp.float64)
        ref, info = _plain(_mixture(), PROCESS.prior_sample(jax.random.key(1), (N, 2), jnp.float64), jax.random.key(2))
        assert int(info["nfe"]) == STEPS
        return x_T, np.asarray(ref)


# ---------------------------------------------------------------------------- the coupling


@pytest.mark.parametrize("d", [0.0, 0.4, 1.5, 3.0])
def test_reflection_coupling_is_maximal_with_exact_marginals(x64, d):
    """``y ~ N(mean_p, std^2 I)`` and ``P(x == y) = 2 Phi(-d / 2) = 1 - TV`` for ``|mean_p - mean_q| = d std``."""
    n, dim, std = 200_000, 3, 0.7
    mean_q = jnp.asarray([0.3, -1.0, 2.0])
    direction = jnp.asarray([1.0, 2.0, -2.0]) / 3.0
    mean_p = mean_q + d * std * direction
    kz, ku = jax.random.split(jax.random.key(int(10 * d)))
    z = jax.random.normal(kz, (n, dim), jnp.float64)
    u = jax.random.uniform(ku, (n,), jnp.float64)
    b = lambda m: jnp.broadcast_to(m, (n, dim))
    x, y, coupled = jax.jit(reflection_coupling)(z, u, b(mean_q), b(mean_p), std)
    x, y, coupled = np.asarray(x), np.asarray(y), np.asarray(coupled)

    # the draw of q is the proposal itself
    np.testing.assert_allclose(x, np.asarray(mean_q) + std * np.asarray(z), rtol=0, atol=1e-12)
    # the output's first two moments are those of p
    se_mean = std / math.sqrt(n)
    assert np.all(np.abs(y.mean(0) - np.asarray(mean_p)) <= 4.5 * se_mean), (y.mean(0), mean_p)
    cov = np.cov(y.T)
    se_var = std**2 * math.sqrt(2.0 / n)
    np.testing.assert_array_less(np.abs(cov - std**2 * np.eye(dim)), 4.5 * se_var)
    # along the line of the means (the only coordinate the coupling touches) it is N(d, 1) exactly
    v = (y - np.asarray(mean_q)) @ np.asarray(direction) / std
    assert scipy.stats.kstest(v, scipy.stats.norm(loc=d).cdf).pvalue > LEVEL
    # maximal: the proposal is kept with probability 1 - TV, and a reflected output differs from it
    overlap = 2.0 * scipy.stats.norm.cdf(-d / 2.0)
    frac = coupled.mean()
    assert abs(frac - overlap) <= 4.5 * math.sqrt(overlap * (1 - overlap) / n), (frac, overlap)
    assert np.all((x == y).all(-1) == coupled)


# ---------------------------------------------------------------------------- exactness


def test_bad_draft_still_gives_the_target_distribution(x64, reference, monkeypatch):
    """A draft far from the target is corrected exactly; the test detects the draft and a wrong coupling."""
    x_T, ref = reference
    target, bad = _mixture(), _mixture(*BAD)
    x, info = _spec(target, bad, x_T, jax.random.key(3))
    ok, p = _same_distribution(x, ref)
    assert ok, p
    assert 0.5 < float(info["acceptance_rate"]) < 0.95  # many rejections: the coupling is exercised
    w = np.bincount(_classes(x), minlength=3) / N
    assert np.all(np.abs(w - np.asarray(WEIGHTS)) <= 4 * np.sqrt(np.asarray(WEIGHTS) * 0.8 / N) + 0.01), w

    # Power: the same test rejects the draft's own ancestral sampler ...
    draft_only, _ = _plain(bad, x_T, jax.random.key(4))
    ok, p = _same_distribution(draft_only, ref)
    assert not ok, p

    # ... and a sampler that keeps the draft's noise without reflecting it (synchronous coupling).
    def synchronous(z, u, mean_q, mean_p, std):
        x, _, coupled = reflection_coupling(z, u, mean_q, mean_p, std)
        y = mean_p + broadcast_to(std, z) * z
        return x, jnp.where(broadcast_to(coupled, x), x, y), coupled

    monkeypatch.setattr(speculative_module, "reflection_coupling", synchronous)
    wrong, _ = jax.jit(
        lambda x, key: speculative_sample(target.denoiser(PROCESS), bad.denoiser(PROCESS), PROCESS, x, key, steps=STEPS)
    )(x_T, jax.random.key(3))
    ok, p = _same_distribution(wrong, ref)
    assert not ok, p


def test_good_draft_halves_sequential_target_calls(x64, reference):
    """``K = 4`` with a good draft: at most ``steps / 2`` sequential target calls for the whole batch."""
    x_T, ref = reference
    x, info = _spec(_mixture(), _mixture(*GOOD), x_T, jax.random.key(5))
    ok, p = _same_distribution(x, ref)
    assert ok, p
    calls = int(info["target_calls"])
    print("good draft:", {k: float(v) for k, v in info.items() if k != "ts"})
    assert calls <= STEPS // 2, calls
    assert float(info["acceptance_rate"]) > 0.9
    assert float(info["accepted_length"]) > 3.0
    assert int(info["target_nfe"]) == calls * N * (K + 1)
    assert int(info["draft_calls"]) == calls * K and int(info["draft_nfe"]) == calls * K * N
    assert int(info["nfe"]) == calls * (K + 1)
    # every example advanced through all its steps: mean advance x rounds = steps
    assert float(info["mean_advance"]) * float(info["rounds_per_example"]) == pytest.approx(STEPS)


def test_frozen_draft_is_exact_and_faster(x64, reference):
    """The frozen draft (no draft network) on the 20-step grid: exact, and fewer target calls than steps."""
    x_T, ref = reference
    x, info = _frozen(_mixture(), x_T, jax.random.key(6))
    ok, p = _same_distribution(x, ref)
    assert ok, p
    print("frozen draft:", {k: float(v) for k, v in info.items() if k != "ts"})
    assert int(info["draft_nfe"]) == 0 and int(info["draft_calls"]) == 0
    assert int(info["target_calls"]) <= STEPS // 2
    assert float(info["acceptance_rate"]) > 0.75


def test_class_conditional_target_and_draft(x64):
    """A target and a draft closing over ``(batch,)`` labels (exact conditional denoisers of labelled
    mixtures: class 0 is the first component, class 1 the other two): the target is evaluated on
    every proposal with the batch's labels, and the samples are those of the conditional ancestral
    sampler, with the good draft and with the frozen one."""
    labels = [0, 1, 1]
    y = jnp.arange(N) % 2
    target = _mixture(labels=labels).denoiser(PROCESS, y=y)
    draft = _mixture(*GOOD, labels=labels).denoiser(PROCESS, y=y)
    x_T = PROCESS.prior_sample(jax.random.key(10), (N, 2), jnp.float64)
    plain = jax.jit(lambda x, key: sample(target, PROCESS, x, solver="ddpm", steps=STEPS, key=key))
    ref, _ = plain(PROCESS.prior_sample(jax.random.key(11), (N, 2), jnp.float64), jax.random.key(12))
    for d in (draft, "frozen"):
        run = jax.jit(lambda x, key, d=d: speculative_sample(target, d, PROCESS, x, key, steps=STEPS, K=K))
        x, info = run(x_T, jax.random.key(13))
        ok, p = _same_distribution(x, ref)
        assert ok, (d, p)
        assert int(info["target_calls"]) <= STEPS // 2
        classes = _classes(x)
        assert np.mean(classes[np.asarray(y) == 0] == 0) > 0.999 and np.mean(classes[np.asarray(y) == 1] == 0) < 0.001


# ---------------------------------------------------------------------------- bookkeeping


def test_draft_equal_to_target_accepts_everything(x64, reference):
    """``draft == target``: every proposal accepted, ``K + 1`` steps per round, the same distribution."""
    x_T, ref = reference
    x, info = _spec(_mixture(), _mixture(), x_T, jax.random.key(9))
    assert float(info["acceptance_rate"]) == 1.0
    assert float(info["accepted_length"]) == K  # STEPS is a multiple of K + 1: no round is cut short
    assert int(info["target_calls"]) == STEPS // (K + 1)
    ok, p = _same_distribution(x, ref)
    assert ok, p


def test_counts_are_real_calls_on_a_positive_grid(x64):
    """A grid without the final denoising step; ``target_calls`` and ``draft_calls`` count actual calls."""
    steps, batch = 23, 64
    calls = {"target": 0, "draft": 0}
    den = _mixture().denoiser(PROCESS)

    def counted(name):
        def denoise(x, t):
            jax.debug.callback(lambda: calls.__setitem__(name, calls[name] + 1))
            return den(x, t)

        return denoise

    grid = jnp.linspace(PROCESS.t_max, PROCESS.t_min, steps + 1)
    x_T = PROCESS.prior_sample(jax.random.key(7), (batch, 2), jnp.float64)
    run = jax.jit(
        lambda x, key: speculative_sample(counted("target"), counted("draft"), PROCESS, x, key, steps=steps, grid=grid)
    )
    x, info = run(x_T, jax.random.key(8))
    x.block_until_ready()
    jax.effects_barrier()
    assert float(info["acceptance_rate"]) == 1.0  # the draft is the target
    rounds = math.ceil(steps / (K + 1))
    assert int(info["target_calls"]) == rounds == calls["target"]
    assert int(info["draft_calls"]) == K * rounds == calls["draft"]
    assert float(info["rounds_per_example"]) == rounds
    assert int(info["steps"]) == steps
    # no final denoising step: the output is the noisy state at t_min, close to the data
    assert np.all(np.isfinite(np.asarray(x))) and np.abs(np.asarray(x)).max() < 5.0


def test_bad_arguments():
    den = _mixture().denoiser(PROCESS)
    x = jnp.zeros((4, 2))
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="K"):
        speculative_sample(den, den, PROCESS, x, key, steps=10, K=0)
    with pytest.raises(ValueError, match="draft must be a denoiser or 'frozen'"):
        speculative_sample(den, "student", PROCESS, x, key, steps=10)
    with pytest.raises(TypeError, match="draft"):
        speculative_sample(den, 3, PROCESS, x, key, steps=10)
    with pytest.raises(ValueError, match="key"):
        speculative_sample(den, den, PROCESS, x, None, steps=10)
    with pytest.raises(ValueError, match="steps"):
        speculative_sample(den, den, PROCESS, x, key, steps=1)
    with pytest.raises(ValueError, match="Unknown grid"):
        speculative_sample(den, den, PROCESS, x, key, steps=10, grid="cosine")
    with pytest.raises(ValueError, match="draft must return"):
        speculative_sample(den, lambda x, t: x[:, :1], PROCESS, x, key, steps=10)
