"""The distillation runners (difflax.train.distill) and the generic loop (difflax.train.fit)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import difflax
from difflax.data import make_dataset
from difflax.metrics.sample_based import energy_distance
from difflax.models import MLPResNet
from difflax.train import distill as students
from difflax.train.checkpoint import Checkpointer
from difflax.train.fit import fit

TEACHER_STEPS = 300
NULL = 5  # the null class of the 5-class teacher


@pytest.fixture(scope="module")
def data():
    return make_dataset("grid")


def _untrained_teacher():
    model = MLPResNet(features=32, num_blocks=1, num_classes=5, embedding="fourier", fourier_scale=1.0)
    params = model.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]
    return students.Network(model, params, difflax.EDM(sigma_data=1.0), "edm", (2,))


def _denoising_loss(net, params, batch, key):
    """EDM-weighted denoising loss with EDM noise levels, labels dropped to the null class 20% of the time."""
    k_t, k_eps, k_y = jax.random.split(key, 3)
    x0 = batch["x"]
    y = difflax.losses.drop_condition(k_y, batch["y"], 0.2, NULL)
    t = difflax.losses.sample_t_edm(k_t, (x0.shape[0],), net.process)
    eps = jax.random.normal(k_eps, x0.shape)
    return jnp.mean(
        difflax.losses.denoising_loss(
            net.denoiser(params, y), net.process, x0, t, eps, prediction="x0", weighting="edm"
        )
    )


@pytest.fixture(scope="module")
def teacher(data):
    """A small class-conditional EDM-preconditioned MLP on the toy grid, briefly trained with label dropout
    (so that its conditional and null-class predictions differ, as classifier-free guidance needs)."""
    net = _untrained_teacher()
    state, _ = fit(
        lambda p, batch, k, state: (_denoising_loss(net, p, batch, k), {}),
        net.params,
        students.optimizer(3e-3, TEACHER_STEPS, warmup=20),
        lambda step: data.batch(0, step, 64),
        TEACHER_STEPS,
        key=jax.random.key(11),
        log_every=TEACHER_STEPS,
    )
    return students.Network(net.model, state.params, net.process, "edm", (2,))


@pytest.fixture(scope="module")
def evaluation():
    """Held-out prior draws and balanced labels on which students are compared with their teacher."""
    x_T = difflax.EDM(sigma_data=1.0).prior_sample(jax.random.key(30), (256, 2))
    return x_T, jnp.arange(256) % 5


def _rms(a, b):
    return float(jnp.sqrt(jnp.mean(jnp.sum((a - b) ** 2, axis=-1))))


def _check(student, x_T, y, **kw):
    x = student.sample(student.params, jax.random.key(1), x_T, y, **kw)
    assert x.shape == x_T.shape and bool(jnp.all(jnp.isfinite(x)))
    assert student.history and all(np.isfinite(h["loss"]) for h in student.history)
    return x


def _closer(after, before, factor, what):
    """Training moved the student towards its target: ``after < factor * before`` (``before``: the untrained one)."""
    assert after < factor * before, f"{what}: trained {after:.4f}, untrained {before:.4f} (needs < {factor} x)"


def test_teacher_learned_the_data(teacher, data):
    batch = data.batch(1, 0, 512)  # another seed: held out from the teacher's batches
    key = jax.random.key(12)
    before = float(_denoising_loss(teacher, _untrained_teacher().params, batch, key))
    after = float(_denoising_loss(teacher, teacher.params, batch, key))
    _closer(after, before, 0.95, "held-out denoising loss")


def test_progressive_runner_halves_steps(teacher, data, evaluation):
    """The 2-step student is closer to the teacher's 8-step DDIM sampler than the teacher's own 2 steps."""
    student = students.progressive(
        teacher,
        data,
        jax.random.key(2),
        start_steps=8,
        end_steps=2,
        steps_per_round=100,
        batch_size=32,
        learning_rate=1e-3,
    )
    assert sorted({h["round"] for h in student.history}) == [0, 1]  # 8 -> 4 -> 2
    x_T = teacher.process.prior_sample(jax.random.key(3), (6, 2))
    _check(student, x_T, jnp.arange(6) % 5, steps=2)
    with pytest.raises(ValueError, match="distilled for 2 steps"):
        student.sample(student.params, jax.random.key(1), x_T, None, steps=4)
    with pytest.raises(ValueError, match="power of 2"):
        students.progressive(teacher, data, jax.random.key(2), start_steps=12, end_steps=8)
    x_T, y = evaluation
    grid = difflax.make_grid("karras", teacher.process, 8)
    target, _ = difflax.sample(
        teacher.denoiser(y=y), teacher.process, x_T, solver="ddim", grid=grid, steps=8, final_zero=True
    )
    before = _rms(student.sample(teacher.params, None, x_T, y, steps=2), target)
    after = _rms(student.sample(student.params, None, x_T, y, steps=2), target)
    _closer(after, before, 0.7, "distance to the teacher's 8 DDIM steps")


@pytest.mark.parametrize("curriculum", [None, "ict", "ect"])
def test_consistency_runner(teacher, data, evaluation, curriculum):
    """Distillation: one step is closer to the teacher's probability-flow solution than the teacher's one
    step. Training (iCT) from a random network, no teacher: one step is closer to held-out data. ECT, tuned
    from the teacher without its ODE: one step is closer to held-out data than the teacher's one step."""
    random_init = _untrained_teacher().params
    student = students.consistency(
        teacher,
        data,
        jax.random.key(4),
        batch_size=32,
        curriculum=curriculum,
        learning_rate=1e-3,
        distill_from_teacher=curriculum is None,
        steps=100 if curriculum == "ict" else 200,
        init_params_from=random_init if curriculum == "ict" else None,
    )
    x_T = teacher.process.prior_sample(jax.random.key(3), (6, 2))
    one, two = (_check(student, x_T, jnp.arange(6) % 5, steps=n) for n in (1, 2))
    assert float(jnp.max(jnp.abs(one - two))) > 0
    x_T, y = evaluation
    if curriculum is None:
        target, _ = difflax.sample(teacher.denoiser(y=y), teacher.process, x_T, solver="heun", steps=18)
        before = _rms(student.sample(teacher.params, None, x_T, y, steps=1), target)
        after = _rms(student.sample(student.params, None, x_T, y, steps=1), target)
        _closer(after, before, 0.8, "distance to the teacher's probability-flow solution")
    else:
        data_x = data.batch(1, 0, 256)["x"]
        start = random_init if curriculum == "ict" else teacher.params
        before = energy_distance(student.sample(start, None, x_T, y, steps=1), data_x)
        after = energy_distance(student.sample(student.params, None, x_T, y, steps=1), data_x)
        factor = 0.3 if curriculum == "ict" else 0.7
        _closer(after, before, factor, "energy distance of one-step samples to held-out data")
        if curriculum == "ect":
            # a record at step k holds the metrics of the update from step k - 1: stage floor(8 (k - 1) / 200)
            assert [h["stage"] for h in student.history] == [(20 * i - 1) * 8 // 200 for i in range(1, 11)]


def test_reflow_runner_writes_pairs(teacher, evaluation, tmp_path):
    """One Euler step of the student lands closer to held-out teacher pairs than one step of the teacher's flow."""
    student, pairs = students.reflow(
        teacher,
        jax.random.key(5),
        num_pairs=256,
        pair_steps=18,
        steps=200,
        batch_size=64,
        learning_rate=3e-3,
        pairs_path=str(tmp_path / "pairs"),
    )
    stored = difflax.distill.load_trajectories(str(tmp_path / "pairs"))
    np.testing.assert_allclose(stored["x0"], pairs["x0"])
    np.testing.assert_allclose(stored["z"] * 80.0, stored["noise"], rtol=1e-5)
    flow = students.flow_of(teacher.process)
    np.testing.assert_allclose([flow.t_min, flow.t_max], [0.002 / 1.002, 80 / 81], rtol=1e-6)
    _check(student, teacher.process.prior_sample(jax.random.key(3), (6, 2)), jnp.arange(6) % 5, steps=2)
    held_out = students.teacher_pairs(teacher, jax.random.key(31), 256)
    before = _rms(student.sample(teacher.params, None, held_out["noise"], held_out["y"], steps=1), held_out["x0"])
    after = _rms(student.sample(student.params, None, held_out["noise"], held_out["y"], steps=1), held_out["x0"])
    _closer(after, before, 0.7, "one-step distance to held-out teacher pairs")


def test_reflow_student_starts_with_the_teachers_ode(teacher):
    """Read on flow_of(process), an EDM network integrates the same ODE: same endpoint from the same noise."""
    flow = students.flow_of(teacher.process)
    x_T = teacher.process.prior_sample(jax.random.key(6), (6, 2))
    y = jnp.arange(6) % 5
    ref, _ = difflax.sample(teacher.denoiser(y=y), teacher.process, x_T, solver="adaptive", steps=2)
    z = x_T * flow.sigma(flow.t_max) / 80.0
    out, _ = difflax.sample(teacher.denoiser(y=y, process=flow), flow, z, solver="adaptive", steps=2)
    assert float(jnp.max(jnp.abs(ref - x_T))) > 1.0  # the ODE was integrated
    np.testing.assert_allclose(out, ref, atol=2e-3)


def test_guidance_runner_starts_as_the_conditional_teacher(teacher, data):
    student = students.guidance(
        teacher, data, jax.random.key(7), steps=0, batch_size=8, sample_t=lambda k, shape: jnp.full(shape, 1.0)
    )
    x = jax.random.normal(jax.random.key(8), (6, 2))
    t, y = jnp.full((6,), 0.7), jnp.arange(6) % 5
    net = students.Network(teacher.model.clone(guidance_embedding=True), student.params, teacher.process, "edm", (2,))
    np.testing.assert_allclose(net.denoiser(y=y, w=jnp.full((6,), 3.0))(x, t), teacher.denoiser(y=y)(x, t), rtol=1e-6)
    trained = students.guidance(
        teacher,
        data,
        jax.random.key(7),
        steps=100,
        batch_size=32,
        learning_rate=1e-3,
        sample_t=lambda k, shape: jax.random.uniform(k, shape, minval=0.1, maxval=10.0),
    )
    _check(trained, teacher.process.prior_sample(jax.random.key(3), (6, 2)), y, steps=2, w=2.0)
    # one call of the trained student at w = 2 is closer to the guided teacher (1 + w) D_c - w D_null
    batch = data.batch(1, 0, 256)
    t = jax.random.uniform(jax.random.key(14), (256,), minval=0.1, maxval=10.0)
    x = teacher.process.marginal(batch["x"], t, jax.random.normal(jax.random.key(15), batch["x"].shape))
    y, w = batch["y"], 2.0
    guided = (1 + w) * teacher.denoiser(y=y)(x, t) - w * teacher.denoiser(y=jnp.full_like(y, NULL))(x, t)
    net = students.Network(teacher.model.clone(guidance_embedding=True), None, teacher.process, "edm", (2,))
    before = _rms(net.denoiser(student.params, y=y, w=jnp.full((256,), w))(x, t), guided)
    after = _rms(net.denoiser(trained.params, y=y, w=jnp.full((256,), w))(x, t), guided)
    assert before > 0.1, "the teacher's conditional and null-class predictions hardly differ"
    _closer(after, before, 0.7, "distance to the guided teacher at w = 2")

    # stage two: a 2-step progressive student of the guided student, at w = 2 closer to the guided student's
    # 8 DDIM steps than the guided student's own 2 steps
    guided_net = students.guided_network(teacher, trained)
    stage2 = students.progressive(
        guided_net, data, jax.random.key(2), start_steps=8, end_steps=2, steps_per_round=100, batch_size=32,
        learning_rate=1e-3, w_range=(0.0, 4.0),
    )  # fmt: skip
    x_T, y = teacher.process.prior_sample(jax.random.key(30), (256, 2)), jnp.arange(256) % 5
    grid = difflax.make_grid("karras", teacher.process, 8)
    guided_8 = guided_net.denoiser(y=y, w=jnp.full((256,), w))
    target = difflax.sample(guided_8, teacher.process, x_T, solver="ddim", grid=grid, steps=8, final_zero=True)[0]
    before = _rms(stage2.sample(trained.params, None, x_T, y, steps=2, w=w), target)
    after = _rms(stage2.sample(stage2.params, None, x_T, y, steps=2, w=w), target)
    _closer(after, before, 0.7, "distance to the guided student's 8 DDIM steps at w = 2")
    with pytest.raises(ValueError, match="pass w exactly"):
        stage2.sample(stage2.params, None, x_T, y, steps=2)
    with pytest.raises(ValueError, match="w-conditioned teacher"):
        students.progressive(teacher, data, jax.random.key(2), start_steps=8, end_steps=2, w_range=(0.0, 4.0))
    with pytest.raises(ValueError, match="student of guidance"):
        students.guided_network(teacher, stage2)


def test_dmd_runner(teacher):
    """The one-step generator's distribution is closer to the teacher's (held-out samples) than at its start."""
    student = students.dmd(teacher, jax.random.key(9), steps=200, batch_size=32, num_pairs=256, learning_rate=1e-3)
    assert {"gen", "fake", "regression"} <= set(student.history[-1])
    _check(student, teacher.process.prior_sample(jax.random.key(3), (6, 2)), jnp.arange(6) % 5)
    held_out = students.teacher_pairs(teacher, jax.random.key(31), 256)
    start = {"gen": teacher.params, "fake": teacher.params}
    before = energy_distance(student.sample(start, None, held_out["noise"], held_out["y"]), held_out["x0"])
    after = energy_distance(student.sample(student.params, None, held_out["noise"], held_out["y"]), held_out["x0"])
    _closer(after, before, 0.6, "energy distance of one-step samples to held-out teacher samples")


def test_dmd2_runner(teacher, data):
    """DMD2 with two generator levels: the fake denoiser takes 2 steps per generator step (the generator's
    losses are logged on its turns), the GAN head trains, one-step samples move closer to held-out teacher
    samples than the untrained generator's, and two steps are the generator at sigma 80, then at sigma 1 on
    its output renoised to that level."""
    student = students.dmd2(
        teacher, data, jax.random.key(9), steps=300, batch_size=32, learning_rate=2e-3, fake_updates=2,
        gan_weight=0.03, critic_weight=0.1, generator_times=(80.0, 1.0),
    )  # fmt: skip
    assert all(h["step"] % 2 == 0 and h["gen"] != 0.0 and h["critic"] > 0.0 for h in student.history)
    assert "head" in student.params and student.history[-1]["regression"] == 0.0
    held_out = students.teacher_pairs(teacher, jax.random.key(31), 256)
    noise, y = held_out["noise"], held_out["y"]
    before = energy_distance(student.sample({"gen": teacher.params}, None, noise, y), held_out["x0"])
    after = energy_distance(student.sample(student.params, None, noise, y), held_out["x0"])
    _closer(after, before, 0.6, "energy distance of one-step samples to held-out teacher samples")
    gen = teacher.denoiser(student.params["gen"], y)
    first = gen(noise, jnp.full((256,), 80.0))
    renoised = first + jax.random.normal(jax.random.fold_in(jax.random.key(2), 1), noise.shape)
    np.testing.assert_allclose(
        student.sample(student.params, jax.random.key(2), noise, y, steps=2), gen(renoised, jnp.ones((256,))), rtol=1e-6
    )
    with pytest.raises(ValueError, match="2 level"):
        student.sample(student.params, jax.random.key(1), noise, None, steps=3)
    with pytest.raises(ValueError, match="needs the teacher's training data"):
        students.dmd(teacher, jax.random.key(9), steps=1, gan_weight=0.1)
    with pytest.raises(ValueError, match="generator_times must decrease"):
        students.dmd(teacher, jax.random.key(9), steps=1, generator_times=(1.0, 2.0))


def test_two_time_scale_optimizer():
    """``generator_every = 3``: the ``gen`` parameters move at steps 2, 5, 8, ... only, the others at every step,
    each with its own Adam state (the first generator update is Adam's first step, of size lr)."""
    tx = students.optimizer(0.1, 30, warmup=0, generator_every=3)
    params = {"gen": jnp.ones(2), "fake": jnp.ones(2)}
    state = tx.init(params)
    for step in range(7):
        updates, state = tx.update({"gen": jnp.ones(2), "fake": jnp.ones(2)}, state, params)
        np.testing.assert_allclose(updates["gen"], -0.1 if step % 3 == 2 else 0.0, rtol=1e-5)
        np.testing.assert_allclose(updates["fake"], -0.1, rtol=1e-4)
    with pytest.raises(ValueError, match="generator_every"):
        students.optimizer(0.1, 30, generator_every=0)


@pytest.mark.parametrize("method", ["meanflow", "shortcut", "scm"])
def test_few_step_runners(teacher, data, evaluation, method):
    """MeanFlow, shortcut and sCM distillation start as the teacher and, after 200 steps, one step lands closer to
    the teacher's probability-flow solution than the student's start (for MeanFlow and shortcut models: one Euler
    step of the teacher's flow; for sCM: the teacher's denoiser at sigma_max)."""
    student = getattr(students, method)(teacher, data, jax.random.key(4), steps=200, batch_size=32, learning_rate=1e-3)
    x_T, y = evaluation
    sample = jax.jit(student.sample, static_argnames="steps")
    if method == "scm":
        start = {"net": teacher.params, "weight": student.params["weight"]}
        np.testing.assert_allclose(sample(start, None, x_T, y), teacher.denoiser(y=y)(x_T, 80.0), rtol=1e-5, atol=1e-6)
    else:
        start = students.with_scalar_input(teacher, jax.random.key(0))[1]
        flow = students.flow_of(teacher.process)
        z = x_T * flow.t_max / 80.0
        velocity = difflax.parametrization.denoiser_to(teacher.denoiser(y=y, process=flow), flow, "velocity")
        np.testing.assert_allclose(
            sample(start, None, x_T, y), z - flow.t_max * velocity(z, flow.t_max), rtol=1e-4, atol=1e-5
        )
    assert student.history and all(np.isfinite(h["loss"]) for h in student.history)
    for n in (2, 4) if method != "scm" else (2,):
        assert bool(jnp.all(jnp.isfinite(sample(student.params, jax.random.key(1), x_T, y, steps=n))))
    target, _ = difflax.sample(teacher.denoiser(y=y), teacher.process, x_T, solver="heun", steps=18)
    before = _rms(sample(start, None, x_T, y), target)
    after = _rms(sample(student.params, None, x_T, y), target)
    _closer(after, before, 0.9 if method == "shortcut" else 0.85, "one-step distance to the probability-flow solution")


def test_fit_resumes_exactly(tmp_path):
    """A run stopped at step 4 and resumed from its checkpoint ends where an uninterrupted run ends."""
    target = jnp.array([1.0, -2.0, 0.5])

    def loss_fn(p, batch, key, state):
        noise = jax.random.normal(key, p.shape)
        return jnp.sum((p - target - 0.1 * noise) ** 2 * batch["w"]), {}

    def batches(step):
        return {"w": jnp.asarray(1.0 + step % 3, jnp.float32)}

    tx, key = optax.adam(0.1), jax.random.key(10)
    full, _ = fit(loss_fn, jnp.zeros(3), tx, batches, 8, key=key, ema=0.9)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    fit(loss_fn, jnp.zeros(3), tx, batches, 4, key=key, ema=0.9, checkpointer=ckpt)
    resumed, _ = fit(
        loss_fn,
        jnp.zeros(3),
        tx,
        batches,
        8,
        key=key,
        ema=0.9,
        checkpointer=Checkpointer(str(tmp_path / "ckpt"), async_save=False),
    )
    assert int(resumed.step) == 8
    np.testing.assert_array_equal(resumed.params, full.params)
    np.testing.assert_array_equal(resumed.ema_params, full.ema_params)
