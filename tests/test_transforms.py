"""``difflax.sample`` and the train step under the program transforms: no jit, jit, and pmap on 8 devices.

Each case runs with and without ``jax.jit`` (``chex.variants``) against the untransformed
call. The ``pmap`` cases need 8 devices, which XLA creates on the CPU only before JAX starts,
so they run in a child process (:func:`pmap_checks`):

* ``sample`` is per-example for these solvers: a deterministic solver pmapped over 8 shards
  of a batch equals the unsharded batch; a stochastic one, given the same key on every
  device, equals each shard sampled on its own with that key.
* the train step built with ``axis_name`` and pmapped over 8 shards, one replica of the
  state per device, is data-parallel (:func:`data_parallel_checks`): after each step all
  replicas are bit-identical, and equal a reference computed without ``pmap`` from the
  recipe's own loss: per-device gradients with the step key folded with the device index,
  averaged, then one optax update and one EMA update. Its metrics are the device means.
  A non-finite gradient on one device makes every replica skip the update.
* the train step built without ``axis_name`` averages nothing over devices: pmapped, each
  replica equals the jitted step on its own shard.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import parameterized

import difflax
from difflax.analytic import GaussianMixture

ROOT = Path(__file__).resolve().parents[1]
DEVICES = 8
STEPS = 6
TOL = {"rtol": 1e-5, "atol": 1e-6}

GM = GaussianMixture.isotropic(jnp.array([[-1.5, 0.5], [1.0, -1.0], [0.5, 2.0]]), jnp.array([0.3, 0.4, 0.2]))
PROCESS = difflax.DiscreteVP.linear()
SOLVERS = (("deterministic", "dpmpp_2m"), ("stochastic", "ddpm"))


def sampler(solver: str):
    """``run(x_T, key) -> (x0, info)`` on the exact mixture denoiser; the key is used by stochastic solvers only."""
    stochastic = solver == "ddpm"

    def run(x_T, key):
        return difflax.sample(GM.denoiser(PROCESS), PROCESS, x_T, solver=solver, steps=STEPS,
                              key=key if stochastic else None)

    return run


def noise(batch: int = 16):
    return PROCESS.prior_sample(jax.random.key(0), (batch, 2)), jax.random.key(1)


def train_recipe(grad_clip: float | None = None):
    """The tiny toy recipe: ``(config, model, process, tx)``; constant learning rate, no warm-up."""
    from difflax.configs import toy2d
    from difflax.train import builders
    from difflax.train.optim import make_optimizer

    config = toy2d.get_config()
    config.model.kwargs.features = 16
    config.model.kwargs.num_blocks = 1
    config.optim.schedule = "constant"
    config.optim.warmup_steps = 0  # a warm-up from 0 would make the first update zero
    if grad_clip is not None:
        config.optim.grad_clip = grad_clip
    model = builders.build_model(config.model)
    process = builders.build_process(config.process)
    tx = make_optimizer(config.optim, 10)
    return config, model, process, tx


def train_setup(batch: int = 32, axis_name: str | None = None, grad_clip: float | None = None):
    """The tiny toy recipe's train step, its initial state and a batch."""
    from difflax.train import builders
    from difflax.train.state import TrainState
    from difflax.train.step import make_train_step

    config, model, process, tx = train_recipe(grad_clip)
    params = builders.init_params(model, jax.random.key(2), (2,), False)
    state = TrainState.create(params, tx, jax.random.key(3))
    step = make_train_step(model, process, tx, config, axis_name=axis_name)
    x, _ = GM.sample(jax.random.key(4), batch)
    return step, state, {"x": x}


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree.leaves(tree)]


class SampleTransformsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*SOLVERS)
    def test_sample_equals_the_untransformed_call(self, solver):
        run = sampler(solver)
        x_T, key = noise()
        want = run(x_T, key)
        got = self.variant(run)(x_T, key)
        chex.assert_trees_all_close(got, want, **TOL)
        assert int(got[1]["nfe"]) == STEPS
        assert float(jnp.max(jnp.abs(got[0] - x_T))) > 0.5  # the sampler moved the noise


class TrainStepTransformsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_train_step_equals_the_untransformed_call(self):
        step, state, batch = train_setup()
        want = step(state, batch)
        got = self.variant(step)(state, batch)
        chex.assert_trees_all_close(got, want, **TOL)
        new, metrics = got
        assert int(new.step) == 1 and np.isfinite(float(metrics["loss"]))
        moved = max(float(np.max(np.abs(a - b))) for a, b in zip(_leaves(new.params), _leaves(state.params),
                                                                 strict=True))
        assert moved > 1e-4, "the step did not update the parameters"
        # the EMA's first update has the warmed-up decay (1 + 0) / (10 + 0) = 0.1 from ema = params
        ema = optax.incremental_update(new.params, state.ema_params, 0.9)
        chex.assert_trees_all_close(new.ema_params, ema, **TOL)

    def test_axis_name_must_be_a_string(self):
        from difflax.train.step import make_step

        with self.assertRaisesRegex(TypeError, "axis_name must be a str.*got 0 of type int"):
            make_step(lambda params, batch, key, state: (0.0, {}), optax.sgd(0.1), axis_name=0)


# ------------------------------------------------------------------------------------------ pmap, 8 devices
def pmap_checks():
    """The pmap cases; needs ``DEVICES`` devices (run by :func:`test_pmap_on_eight_devices` in a child process)."""
    assert jax.device_count() == DEVICES, jax.devices()
    x_T, key = noise()
    shards = x_T.reshape(DEVICES, -1, 2)
    for name, solver in SOLVERS:
        run = sampler(solver)
        got = jax.pmap(run, in_axes=(0, None))(shards, key)
        assert len(got[0].sharding.device_set) == DEVICES, got[0].sharding
        if name == "deterministic":  # per-example: the sharded batch is the batch
            want = jax.jit(run)(x_T, key)
            chex.assert_trees_all_close(got[0].reshape(x_T.shape), want[0], **TOL)
            assert np.all(np.asarray(got[1]["nfe"]) == int(want[1]["nfe"]))
        else:  # the same key on every device: each shard as sampled on its own
            one = jax.jit(run)
            want = jax.tree.map(lambda *a: jnp.stack(a), *[one(s, key) for s in shards])
            chex.assert_trees_all_close(got, want, **TOL)
            other = jax.pmap(run, in_axes=(0, None))(shards, jax.random.key(2))[0]
            assert float(jnp.max(jnp.abs(other - got[0]))) > 0.1  # the noise comes from the key
        print(f"sample {solver}: pmap ok")

    data_parallel_checks()

    # without an axis name nothing is averaged: each replica trains on its own shard
    step, state, batch = train_setup(batch=4 * DEVICES)
    shards = _shard(batch)
    got = jax.pmap(step)(_replicate(state), shards)
    one = jax.jit(step)
    want = jax.tree.map(lambda *a: jnp.stack(a), *[one(state, jax.tree.map(lambda a, i=i: a[i], shards))
                                                   for i in range(DEVICES)])
    chex.assert_trees_all_close(got, want, **TOL)
    assert int(got[0].step[0]) == 1
    print("train step without axis_name: pmap ok")


def _shard(tree):
    return jax.tree.map(lambda a: np.asarray(a).reshape(DEVICES, -1, *a.shape[1:]), tree)


def _replicate(tree):
    return jax.tree.map(lambda a: np.broadcast_to(np.asarray(a), (DEVICES, *np.shape(a))), tree)


def _replica(tree, i: int = 0):
    return jax.tree.map(lambda a: np.asarray(a)[i], tree)


def _assert_replicas_identical(tree, what):
    """Every leaf's ``DEVICES`` replicas (leading axis) are bit-for-bit the same."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        leaf = np.asarray(leaf)
        assert leaf.shape[0] == DEVICES, (what, path, leaf.shape)
        for i in range(1, DEVICES):
            assert leaf[i].tobytes() == leaf[0].tobytes(), f"{what}{jax.tree_util.keystr(path)}: replica {i} != 0"


def _max_abs_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(_leaves(a), _leaves(b), strict=True))


def data_parallel_reference(loss_fn, tx, config):
    """``reference(state, shards, fold_device=True) -> (state, metrics, per-device losses)``, without ``pmap``.

    One data-parallel step written out: device ``i`` evaluates ``loss_fn`` on shard ``i``
    with the key ``fold_in(fold_in(key, k), i)`` (with ``fold_device=False``: the same key
    on every device); the gradients are averaged over the devices, then the optimizer and
    the EMA are applied once. Metrics: the mean loss, the norm of the averaged gradient and
    the optimizer's count of skipped updates.
    """
    from difflax.train.optim import nonfinite_count, nonfinite_in_a_row
    from difflax.train.state import ema_decay, update_ema

    grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))

    @jax.jit
    def update(state, grads, losses):
        mean_grad = jax.tree.map(lambda *g: jnp.mean(jnp.stack(g), axis=0), *grads)
        updates, opt_state = tx.update(mean_grad, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay(state.step, config.train.ema_decay, config.train.get("ema_warmup", True))
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            ema_params=update_ema(state.ema_params, params, decay))
        metrics = {"loss": jnp.mean(jnp.stack(losses)), "grad_norm": optax.tree.norm(mean_grad),
                   "nonfinite": nonfinite_count(opt_state), "nonfinite_in_a_row": nonfinite_in_a_row(opt_state)}
        return new, metrics

    def reference(state, shards, fold_device: bool = True):
        key = jax.random.fold_in(state.key(), state.step)
        losses, grads = [], []
        for i in range(DEVICES):
            (loss, aux), g = grad(state.params, _replica(shards, i), jax.random.fold_in(key, i) if fold_device else key,
                                  state)
            assert aux == {}, aux
            losses.append(loss)
            grads.append(g)
        new, metrics = update(state, grads, losses)
        return new, metrics, np.asarray(losses)

    return reference


def data_parallel_checks():
    """The train step with ``axis_name`` under ``pmap``: two steps, then a step with a NaN on one device."""
    from difflax.train.step import make_denoising_loss

    clip = 0.05  # below the averaged gradient's norm: clipping is active and must see the averaged gradient
    step, state, _ = train_setup(axis_name="batch", grad_clip=clip)
    config, model, process, tx = train_recipe(grad_clip=clip)
    reference = data_parallel_reference(make_denoising_loss(model, process, config), tx, config)  # the step's loss
    pstep = jax.pmap(step, axis_name="batch")
    replicas, ref = _replicate(state), state
    batches = [{"x": np.array(GM.sample(jax.random.key(10 + k), 4 * DEVICES)[0])} for k in range(3)]
    batches[2]["x"][3 * 4] = np.nan  # device 3's shard has a NaN in step 3
    for k, batch in enumerate(batches):
        shards = _shard(batch)
        before, previous = ref, _replica(replicas)
        replicas, metrics = pstep(replicas, shards)
        ref, ref_metrics, per_device = reference(ref, shards)
        assert len(jax.tree.leaves(replicas.params)[0].sharding.device_set) == DEVICES
        # (a) the replicas of the state (params, EMA, optimizer state, step, key) and the metrics
        # are bit-identical across devices
        _assert_replicas_identical(replicas, f"step {k + 1}: state")
        _assert_replicas_identical(metrics, f"step {k + 1}: metrics")
        got = _replica(replicas)
        # (b) they equal the reference: averaged per-device gradients, one update, one EMA update
        chex.assert_trees_all_close(got, ref, **TOL)
        assert int(got.step) == k + 1
        # (c) the metrics are the means over devices of the per-device metrics
        assert set(metrics) == {"loss", "grad_norm", "nonfinite", "nonfinite_in_a_row"}, metrics.keys()
        chex.assert_trees_all_close(_replica(metrics), ref_metrics, **TOL)
        if k < 2:
            assert np.all(np.isfinite(per_device)) and int(metrics["nonfinite"][0]) == 0
            assert np.ptp(per_device) > 1e-3, per_device  # the devices saw different shards and noise
            assert float(ref_metrics["grad_norm"]) > 2 * clip, ref_metrics  # the clipping is active
            assert _max_abs_diff(got.params, previous.params) > 1e-4, "the step did not update the parameters"
            # device i's noise comes from the key folded with i: one key for all gives another update
            same_key, _, _ = reference(before, shards, fold_device=False)
            assert _max_abs_diff(got.params, same_key.params) > 1e-4
        else:  # a NaN on one device: every replica skips the update
            assert np.isnan(per_device[3]) and np.all(np.isfinite(np.delete(per_device, 3))), per_device
            assert int(metrics["nonfinite"][0]) == 1 and np.isnan(float(metrics["loss"][0]))
            for a, b in zip(_leaves(got.params), _leaves(previous.params), strict=True):
                np.testing.assert_array_equal(a, b)
    print("train step with axis_name: pmap ok")


def test_pmap_on_eight_devices():
    code = "from tests.test_transforms import pmap_checks; pmap_checks()"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                            timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("pmap ok") == 4, result.stdout
