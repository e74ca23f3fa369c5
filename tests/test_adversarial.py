"""Adversarial knowledge distillation (Adv-KD): losses at their optima, the paper's time steps, networks, a toy run."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import difflax
from difflax.data.toy2d import toy_mixture
from difflax.distill import (
    advkd_loss,
    advkd_timesteps,
    critic_loss,
    downsample,
    downsample_targets,
    generator_loss,
    gradient_penalty,
    interpolates,
    stage_factors,
    stage_times,
)
from difflax.metrics.sample_based import sliced_wasserstein
from difflax.models import AdvKDCritics, AdvKDStudent, advkd_networks
from difflax.models.advkd import space_to_depth
from difflax.train.advkd import advkd_teacher_grid, train_advkd


# ---------------------------------------------------------------------------- time steps
def test_paper_timesteps():
    """t_n = 190 n - 10 n^2 + 80 for n = 10 .. 0: the student's order, noisiest first."""
    t = advkd_timesteps()
    assert t.tolist() == [980, 980, 960, 920, 860, 780, 680, 560, 420, 260, 80]
    for k, n in enumerate(range(10, -1, -1)):
        assert t[k] == 190 * n - 10 * n * n + 80
    assert advkd_timesteps(3).tolist() == [420, 260, 80]
    assert advkd_timesteps(1).tolist() == [80]
    assert advkd_timesteps(3, num_timesteps=500).tolist() == [210, 130, 40]
    # the stage targets never get noisier along the chain
    assert np.all(np.diff(t) <= 0)


@pytest.mark.parametrize("bad", [0, 12, 2.0])
def test_timesteps_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="num_stages"):
        advkd_timesteps(bad)


def test_stage_times_discrete_and_matched_log_snr():
    ddpm = difflax.DiscreteVP.linear()
    steps = advkd_timesteps(4)
    np.testing.assert_allclose(stage_times(ddpm, steps), (steps + 1) / 1000.0, rtol=1e-6)
    vp = difflax.VP()
    t = stage_times(vp, steps)
    want = ddpm.log_snr(ddpm.time_from_timestep(steps))
    np.testing.assert_allclose(np.asarray(vp.log_snr(jnp.asarray(t, jnp.float32))), want, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="timesteps"):
        stage_times(ddpm, [1000])


# ---------------------------------------------------------------------------- resolutions
def test_stage_factors():
    assert stage_factors(4, (8, 8), 2) == (4, 2, 2, 1)
    assert stage_factors(3, (8, 8), 2) == (4, 2, 1)
    assert stage_factors(2, (8, 8), 2) == (4, 1)
    assert stage_factors(12, (256, 256), 4)[0] == 64
    assert stage_factors(5, (), 2) == (1,) * 5  # flat data has no resolution
    assert stage_factors(1, (8, 8)) == (1,)
    for n in range(1, 13):
        f = stage_factors(n, (16, 16), 2)
        assert f[-1] == 1 and all(a >= b and a % b == 0 for a, b in itertools.pairwise(f))


def test_downsample_is_average_pooling():
    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    y = downsample(x, 2)
    assert y.shape == (2, 2, 2, 3)
    np.testing.assert_allclose(y[1, 0, 1, 2], np.mean(np.asarray(x)[1, 0:2, 2:4, 2]))
    np.testing.assert_allclose(downsample(x, 4)[:, 0, 0], np.asarray(x).mean(axis=(1, 2)), rtol=1e-6)
    assert downsample(x, 1) is x
    flat = jnp.ones((5, 2))
    assert downsample(flat, 1) is flat
    with pytest.raises(ValueError, match="factor"):
        downsample(flat, 2)
    with pytest.raises(ValueError, match="divide"):
        downsample(jnp.ones((1, 6, 6, 1)), 4)


# ---------------------------------------------------------------------------- losses at their optima
def _mlp_critic(key, dim):
    k1, k2 = jax.random.split(key)
    w1, w2 = jax.random.normal(k1, (dim, 16)), jax.random.normal(k2, (16,))
    return lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2


def test_downsample_targets_pools_each_teacher_state_to_its_stage():
    states = jax.random.normal(jax.random.key(0), (3, 4, 8, 8, 1))
    targets = downsample_targets(states, (4, 2, 1))
    assert [t.shape for t in targets] == [(4, 2, 2, 1), (4, 4, 4, 1), (4, 8, 8, 1)]
    np.testing.assert_allclose(targets[0], states[0].reshape(4, 2, 4, 2, 4, 1).mean(axis=(2, 4)), rtol=1e-6)
    np.testing.assert_array_equal(targets[2], states[2])


def test_critic_loss_vanishes_when_real_equals_fake():
    x = jax.random.normal(jax.random.key(1), (32, 3))
    critic = _mlp_critic(jax.random.key(2), 3)
    assert float(critic_loss(critic, x, x)) == 0.0
    fake = x + 1.0
    np.testing.assert_allclose(critic_loss(critic, x, fake), critic(fake).mean() - critic(x).mean(), rtol=1e-6)
    np.testing.assert_allclose(generator_loss(critic, fake), -critic(fake).mean(), rtol=1e-6)


def test_gradient_penalty_zero_for_unit_lipschitz_linear_critic():
    key = jax.random.key(3)
    real, fake = jax.random.normal(key, (2, 64, 4, 4, 1))
    w = jax.random.normal(jax.random.key(4), (16,))
    unit = lambda x: x.reshape(x.shape[0], -1) @ (w / jnp.linalg.norm(w))
    assert float(gradient_penalty(unit, real, fake, key)) == pytest.approx(0.0, abs=1e-9)
    # |grad| = 3 everywhere: lambda (3 - 1)^2
    steep = lambda x: x.reshape(x.shape[0], -1) @ (3.0 * w / jnp.linalg.norm(w))
    np.testing.assert_allclose(gradient_penalty(steep, real, fake, key), 10.0 * 4.0, rtol=1e-5)
    np.testing.assert_allclose(gradient_penalty(steep, real, fake, key, weight=2.0), 8.0, rtol=1e-5)


def test_gradient_penalty_against_hand_computation():
    """D(x) = sum(a * x^2) / 2 has grad a * x: penalty = lambda mean_i (|a * x_hat_i| - 1)^2."""
    key = jax.random.key(5)
    real = jax.random.normal(jax.random.key(6), (16, 3))
    fake = 2.0 + jax.random.normal(jax.random.key(7), (16, 3))
    a = jnp.array([0.5, 1.0, 2.0])
    critic = lambda x: 0.5 * jnp.sum(a * x**2, axis=1)
    x_hat = np.asarray(interpolates(real, fake, key))
    e = (x_hat - np.asarray(fake)) / (np.asarray(real) - np.asarray(fake))
    assert np.allclose(e, e[:, :1], atol=1e-4) and np.all((e >= 0) & (e <= 1))  # one e per example
    norms = np.linalg.norm(np.asarray(a) * x_hat, axis=1)
    want = 10.0 * np.mean((norms - 1.0) ** 2)
    np.testing.assert_allclose(gradient_penalty(critic, real, fake, key), want, rtol=1e-5)


# ---------------------------------------------------------------------------- the two-player loss
def _toy_players(key):
    """A linear student with two outputs and a per-stage quadratic-tanh critic, as plain callables."""
    k = jax.random.split(key, 4)
    params = {
        "student": {"a": jax.random.normal(k[0], (2, 2)), "b": jax.random.normal(k[1], (2, 2))},
        "critic": {"w": jax.random.normal(k[2], (2, 2, 8)), "v": jax.random.normal(k[3], (2, 8))},
    }

    def student(p, z):
        y0 = z @ p["a"]
        return y0, jnp.tanh(y0) @ p["b"]

    def critic(p, n, x):
        return jnp.tanh(x @ p["w"][n]) @ p["v"][n]

    return params, student, critic


def test_advkd_loss_gives_each_player_its_own_gradient():
    params, student, critic = _toy_players(jax.random.key(8))
    z = jax.random.normal(jax.random.key(9), (32, 2))
    targets = (jax.random.normal(jax.random.key(10), (32, 2)), jax.random.normal(jax.random.key(11), (32, 2)))
    key = jax.random.key(12)
    kw = dict(adversarial_weight=0.3, regression_weight=2.0)
    grads = jax.jit(jax.grad(lambda p: advkd_loss(student, critic, p, z, targets, key, **kw)[0]))(params)
    keys = jax.random.split(key, 2)

    def critic_objective(c):
        fakes = student(params["student"], z)
        return sum(
            critic_loss(lambda x, n=n: critic(c, n, x), targets[n], fakes[n])
            + gradient_penalty(lambda x, n=n: critic(c, n, x), targets[n], fakes[n], keys[n])
            for n in range(2)
        )

    def student_objective(s):
        fakes = student(s, z)
        return sum(
            0.3 * generator_loss(lambda x, n=n: critic(params["critic"], n, x), fakes[n])
            + 2.0 * jnp.mean((fakes[n] - targets[n]) ** 2)
            for n in range(2)
        )

    for got, want in [
        (grads["critic"], jax.jit(jax.grad(critic_objective))(params["critic"])),
        (grads["student"], jax.jit(jax.grad(student_objective))(params["student"])),
    ]:
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6)


def test_advkd_loss_at_the_target_mapping():
    """A student that reproduces the targets: zero regression and a zero Wasserstein estimate at every stage."""
    params, student, critic = _toy_players(jax.random.key(13))
    z = jax.random.normal(jax.random.key(14), (64, 2))
    targets = student(params["student"], z)
    loss, metrics = advkd_loss(student, critic, params, z, targets, jax.random.key(15), regression_weight=1.0)
    assert float(metrics["mse"]) == 0.0
    assert float(metrics["w_dist_0"]) == 0.0 and float(metrics["w_dist_1"]) == 0.0
    # what is left of the loss is the penalty plus the student's -E[D(y)] terms
    gen = sum(float(generator_loss(lambda x, n=n: critic(params["critic"], n, x), targets[n])) for n in range(2))
    np.testing.assert_allclose(loss, float(metrics["gp"]) + gen, rtol=1e-5)
    loss, metrics = advkd_loss(
        student, critic, params, z, targets, jax.random.key(15), adversarial_weight=0.0, regression_weight=1.0
    )
    assert float(loss) == 0.0 and "w_dist" not in metrics
    with pytest.raises(ValueError, match="targets"):
        advkd_loss(student, critic, params, z, targets[:1], jax.random.key(15))


# ---------------------------------------------------------------------------- networks
def test_image_student_and_critics_shapes():
    student, critics = advkd_networks((8, 8, 1), 4)
    assert tuple(student.factors) == (4, 2, 2, 1)
    z = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
    params = jax.jit(student.init)(jax.random.key(1), z)["params"]
    outs = jax.jit(student.apply)({"params": params}, z)
    assert [o.shape for o in outs] == [(3, 2, 2, 1), (3, 4, 4, 1), (3, 4, 4, 1), (3, 8, 8, 1)]
    assert all(bool(jnp.all(jnp.isfinite(o))) for o in outs)
    init_all = lambda k, xs: critics.init(k, xs, method=AdvKDCritics.init_all)
    cparams = jax.eval_shape(init_all, jax.random.key(2), outs)["params"]
    assert set(cparams) == {f"critic{s}" for s in range(4)}
    for s, o in enumerate(outs):
        assert jax.eval_shape(lambda p, x, s=s: critics.apply({"params": p}, x, s), cparams, o).shape == (3,)
    with pytest.raises(ValueError, match="stage"):
        jax.eval_shape(lambda p, x: critics.apply({"params": p}, x, 4), cparams, outs[0])


def test_flat_student_and_critics_shapes():
    student, critics = advkd_networks((2,), 3, features=32, critic_features=32)
    z = jax.random.normal(jax.random.key(0), (5, 2))
    params = jax.jit(student.init)(jax.random.key(1), z)["params"]
    outs = jax.jit(student.apply)({"params": params}, z)
    assert [o.shape for o in outs] == [(5, 2)] * 3
    cparams = jax.jit(lambda k, xs: critics.init(k, xs, method=AdvKDCritics.init_all))(jax.random.key(2), outs)
    assert jax.jit(lambda p, x: critics.apply(p, x, 1))(cparams, outs[1]).shape == (5,)


def test_critic_scores_do_not_mix_examples():
    """The penalty's per-example gradient needs a critic without batch coupling."""
    _, critics = advkd_networks((8, 8, 1), 3)
    x = jax.random.normal(jax.random.key(0), (4, 4, 4, 1))
    outs = (jnp.zeros((4, 2, 2, 1)), x, jnp.zeros((4, 8, 8, 1)))
    cparams = jax.jit(lambda k, xs: critics.init(k, xs, method=AdvKDCritics.init_all))(jax.random.key(1), outs)
    jac = jax.jit(jax.jacobian(lambda v: critics.apply(cparams, v, 1)))(x)
    off = np.asarray(jac).copy()
    off[np.arange(4), np.arange(4)] = 0.0
    assert np.all(off == 0.0) and np.any(np.asarray(jac) != 0.0)


def test_space_to_depth_is_lossless_and_networks_validate():
    z = jnp.arange(2 * 8 * 8, dtype=jnp.float32).reshape(2, 8, 8, 1)
    y = space_to_depth(z, 4)
    assert y.shape == (2, 2, 2, 16)
    np.testing.assert_array_equal(np.sort(np.asarray(y).ravel()), np.asarray(z).ravel())
    np.testing.assert_array_equal(y[0, 1, 0], np.asarray(z)[0, 4:8, 0:4, 0].ravel())
    with pytest.raises(ValueError, match="full resolution"):
        AdvKDStudent((8, 8, 1), (4, 2)).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError, match="no resolution"):
        AdvKDStudent((2,), (2, 1)).init(jax.random.key(0), jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="shape"):
        AdvKDStudent((8, 8, 1), (2, 1)).init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))


def test_teacher_grid_holds_the_stage_times():
    process = difflax.DiscreteVP.linear()
    times = stage_times(process, advkd_timesteps())
    ts, idx = advkd_teacher_grid(process, times, steps=20, solver="ddim")
    assert ts[-1] == 0.0 and np.all(np.diff(ts) < 0)
    np.testing.assert_allclose(ts[idx], times, atol=1e-6)
    assert idx[0] == idx[1]  # n = 9 and n = 10 share t = 980
    base = np.asarray(difflax.make_grid("uniform", process, 20), np.float64)  # DDIM's default grid
    new = [t for t in np.unique(times) if not np.any(np.abs(base - t) <= 1e-6)]
    assert len(ts) == len(base) + len(new)
    assert all(np.any(np.abs(ts - b) < 1e-12) for b in base)


# ---------------------------------------------------------------------------- end to end
def test_train_advkd_rejects_bad_arguments():
    process = difflax.DiscreteVP.linear()
    teacher = toy_mixture("rings").denoiser(process)
    with pytest.raises(ValueError, match="critic_steps"):
        train_advkd(teacher, process, (2,), jax.random.key(0), steps=1, critic_steps=0)
    with pytest.raises(ValueError, match="non-increasing"):
        train_advkd(teacher, process, (2,), jax.random.key(0), steps=1, timesteps=[80, 260])
    with pytest.raises(ValueError, match="trajectories"):
        bad = {"noise": jnp.zeros((4, 2)), "intermediates": jnp.zeros((2, 4, 2))}
        train_advkd(teacher, process, (2,), jax.random.key(0), steps=1, num_stages=2, trajectories=bad)


@pytest.mark.slow
def test_advkd_toy2d_beats_the_few_step_teacher():
    """A one-pass student (2 stages + sample) of an exact-denoiser DDIM teacher beats DDIM with 1 and 3 steps.

    The teacher is DDIM (25 steps, the stage times t_1 = 260 and t_0 = 80 inserted) with the exact
    denoiser of the 8-mode ring mixture; the student is trained with the per-stage critics
    plus the regression term. About 30 s of CPU.
    """
    mixture = toy_mixture("rings")
    process = difflax.DiscreteVP.linear()
    teacher = mixture.denoiser(process)
    result = train_advkd(
        teacher,
        process,
        (2,),
        jax.random.key(0),
        steps=400,
        num_stages=2,
        num_trajectories=1024,
        chunk=1024,
        teacher_steps=25,
        batch_size=128,
        regression_weight=1.0,
        adversarial_weight=0.1,
        learning_rate=1e-3,
        critic_learning_rate=2e-3,
        ema=0.99,
        features=64,
        critic_features=64,
        log_every=400,
    )
    assert result.times.tolist() == pytest.approx([0.261, 0.081, 0.0])
    assert result.trajectories["intermediates"].shape == (3, 1024, 2)
    data, _ = mixture.sample(jax.random.key(1), 1000)
    sw = lambda x: float(sliced_wasserstein(x, data, key=jax.random.key(2)))
    student = sw(result.sample(jax.random.key(3), 1000))
    x_T = process.prior_sample(jax.random.key(4), (1000, 2))
    one = sw(difflax.sample(teacher, process, x_T, solver="ddim", steps=1)[0])
    few = sw(difflax.sample(teacher, process, x_T, solver="ddim", steps=3)[0])
    assert student < 0.5 * few < 0.5 * one, (student, few, one)
    # every stage follows the teacher's state at its time (summed per-element MSE), and the critics ran
    last = result.history[-1]
    assert last["mse"] < 0.1 and np.isfinite(last["w_dist"]) and last["gp"] > 0
