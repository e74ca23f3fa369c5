"""The distillation runners (difflax.train.students) and the generic loop (difflax.train.fit)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import difflax
from difflax.data import make_dataset
from difflax.models import MLPResNet
from difflax.train import students
from difflax.train.checkpoint import Checkpointer
from difflax.train.fit import fit


@pytest.fixture(scope="module")
def teacher():
    """A small class-conditional EDM-preconditioned MLP on the toy grid (untrained: the runners' mechanics)."""
    model = MLPResNet(features=32, num_blocks=1, num_classes=5, embedding="fourier", fourier_scale=1.0)
    params = model.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]
    return students.Network(model, params, difflax.EDM(sigma_data=1.0), "edm", (2,))


@pytest.fixture(scope="module")
def data():
    return make_dataset("grid")


def _check(student, x_T, y, **kw):
    x = student.sample(student.params, jax.random.key(1), x_T, y, **kw)
    assert x.shape == x_T.shape and bool(jnp.all(jnp.isfinite(x)))
    assert student.history and all(np.isfinite(h["loss"]) for h in student.history)
    return x


def test_progressive_runner_halves_steps(teacher, data):
    student = students.progressive(teacher, data, jax.random.key(2), start_steps=8, end_steps=2, steps_per_round=3,
                                   batch_size=8)
    assert sorted({h["round"] for h in student.history}) == [0, 1]  # 8 -> 4 -> 2
    x_T = teacher.process.prior_sample(jax.random.key(3), (6, 2))
    _check(student, x_T, jnp.arange(6) % 5, steps=2)
    with pytest.raises(ValueError, match="distilled for 2 steps"):
        student.sample(student.params, jax.random.key(1), x_T, None, steps=4)
    with pytest.raises(ValueError, match="power of 2"):
        students.progressive(teacher, data, jax.random.key(2), start_steps=12, end_steps=8)


@pytest.mark.parametrize("curriculum", [None, "ict"])
def test_consistency_runner(teacher, data, curriculum):
    student = students.consistency(teacher, data, jax.random.key(4), steps=3, batch_size=8, curriculum=curriculum,
                                   distill_from_teacher=curriculum is None)
    x_T = teacher.process.prior_sample(jax.random.key(3), (6, 2))
    one, two = (_check(student, x_T, jnp.arange(6) % 5, steps=n) for n in (1, 2))
    assert float(jnp.max(jnp.abs(one - two))) > 0


def test_reflow_runner_writes_pairs(teacher, tmp_path):
    student, pairs = students.reflow(teacher, jax.random.key(5), num_pairs=16, pair_steps=4, steps=3, batch_size=8,
                                     pairs_path=str(tmp_path / "pairs"))
    stored = difflax.distill.load_trajectories(str(tmp_path / "pairs"))
    np.testing.assert_allclose(stored["x0"], pairs["x0"])
    np.testing.assert_allclose(stored["z"] * 80.0, stored["noise"], rtol=1e-5)
    flow = students.flow_of(teacher.process)
    np.testing.assert_allclose([flow.t_min, flow.t_max], [0.002 / 1.002, 80 / 81], rtol=1e-6)
    _check(student, teacher.process.prior_sample(jax.random.key(3), (6, 2)), jnp.arange(6) % 5, steps=2)


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
    student = students.guidance(teacher, data, jax.random.key(7), steps=0, batch_size=8,
                                sample_t=lambda k, shape: jnp.full(shape, 1.0))
    x = jax.random.normal(jax.random.key(8), (6, 2))
    t, y = jnp.full((6,), 0.7), jnp.arange(6) % 5
    net = students.Network(teacher.model.clone(guidance_embedding=True), student.params, teacher.process, "edm", (2,))
    np.testing.assert_allclose(net.denoiser(y=y, w=jnp.full((6,), 3.0))(x, t), teacher.denoiser(y=y)(x, t),
                               rtol=1e-6)
    trained = students.guidance(teacher, data, jax.random.key(7), steps=3, batch_size=8,
                                sample_t=lambda k, shape: jax.random.uniform(k, shape, minval=0.1, maxval=10.0))
    _check(trained, teacher.process.prior_sample(jax.random.key(3), (6, 2)), y, steps=2, w=2.0)


def test_dmd_runner(teacher):
    student = students.dmd(teacher, jax.random.key(9), steps=3, batch_size=8, num_pairs=16, pair_steps=4)
    assert {"gen", "fake", "regression"} <= set(student.history[-1])
    _check(student, teacher.process.prior_sample(jax.random.key(3), (6, 2)), jnp.arange(6) % 5)


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
    resumed, _ = fit(loss_fn, jnp.zeros(3), tx, batches, 8, key=key, ema=0.9,
                     checkpointer=Checkpointer(str(tmp_path / "ckpt"), async_save=False))
    assert int(resumed.step) == 8
    np.testing.assert_array_equal(resumed.params, full.params)
    np.testing.assert_array_equal(resumed.ema_params, full.ema_params)
