"""Training on a named device mesh: FSDP and tensor parallelism equal data parallelism, use less memory per
device, and checkpoints restore onto another topology.

The 8-device checks run once, in one subprocess with 8 CPU devices (``python -m tests.test_mesh``): it
trains a tiny U-Net (FSDP) and a tiny DiT (FSDP x model) for a few steps against the replicated run, saves
and restores across meshes, lays out the state of every mesh abstractly,
and prints its measurements as one JSON line that the tests below read.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from difflax.models import dit
from difflax.train import ConfigError, Trainer, TrainState, check_config, make_mesh, make_optimizer, shard_batch
from difflax.train.sharding import (
    FSDP_AXIS,
    MODEL_AXIS,
    bytes_per_device,
    mesh_shape,
    partition_spec,
    state_shardings,
)

ROOT = Path(__file__).resolve().parents[1]
DEVICES = 8
STEPS = 3
#: Meshes of the equivalence checks: data parallel (the default), FSDP, FSDP x tensor parallel.
MESHES = {"replicated": None, "fsdp": {"data": 1, "fsdp": 8}, "fsdp_model": {"data": 1, "fsdp": 4, "model": 2}}
#: The sharded mesh each model is trained on against the replicated run (FSDP alone, and FSDP x tensor parallel).
TRAINED = {"unet": "fsdp", "dit": "fsdp_model"}


def tiny_config(model: str, steps: int = STEPS):
    """The digits recipe with a tiny U-Net (one level, attention at 8x8) or a one-block DiT.

    The learning rate is small because Adam divides by the root mean square of the gradient:
    where the zero-initialized output layers make gradients nearly zero, float32 rounding of
    the gradient becomes an update difference of up to the learning rate itself.
    """
    from difflax.configs import digits

    config = digits.get_config()
    config.train.steps, config.train.batch_size = steps, 16
    config.train.async_checkpoint = False
    config.optim.warmup_steps, config.optim.learning_rate = 0, 1e-4
    config.eval.every = 0
    if model == "unet":
        kwargs = config.model.kwargs
        kwargs.base_channels, kwargs.norm_groups, kwargs.channel_mult, kwargs.attention_resolutions = 8, 4, (1,), (8,)
    else:
        config.model.name = "dit"
        config.model.kwargs = {"patch_size": 2, "hidden_size": 32, "depth": 1, "num_heads": 4}
    return config


def _leaves(state):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}


def _max_diff(a, b):
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


def _train(trainer, state, steps):
    config = trainer.config
    for step in range(int(state.step), int(state.step) + steps):
        batch = trainer.dataset.batch(config.seed, step, config.train.batch_size)
        state, _ = trainer._step(state, shard_batch(batch, trainer.mesh))
    return state


def _abstract_state(config, mesh_shape_):
    """The train state's shapes and shardings for ``config`` on a mesh: nothing is allocated or compiled."""
    trainer = Trainer(config, tempfile.mkdtemp(), mesh=make_mesh(shape=mesh_shape_))
    return trainer.abstract_state(), trainer.state_sharding


def _run_on_8_devices() -> dict:
    """Every measurement of the module, on ``jax.devices()`` (8 CPU devices).

    Training (each run compiles a train step, the slow part) covers FSDP on the U-Net and FSDP x model
    on the DiT; the DiT run also saves at step 2 for the resharding restore. Layouts and bytes of every
    mesh come from abstract states.
    """
    assert jax.device_count() == DEVICES
    out = {"max_diff": {}, "bytes": {}, "spec": {}}
    workdir = tempfile.mkdtemp()
    for model in ("unet", "dit"):
        for name, shape in MESHES.items():
            config = tiny_config(model)
            config.mesh = shape
            abstract, shardings = _abstract_state(config, shape)
            placed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
            out["bytes"][f"{model}_{name}"] = bytes_per_device((placed.params, placed.opt_state))
            specs = jax.tree_util.tree_leaves_with_path(shardings)
            out["spec"][f"{model}_{name}"] = {
                "replicated": all(s.is_fully_replicated for _, s in specs),
                "qkv": [str(s.spec) for p, s in specs if jax.tree_util.keystr(p).endswith("['qkv']['kernel']")],
            }
        states = {}
        for name in ("replicated", TRAINED[model]):
            config = tiny_config(model)
            config.mesh = MESHES[name]
            trainer = Trainer(config, f"{workdir}/{model}_{name}")
            state = _train(trainer, trainer.init_state(), STEPS - 1)
            if model == "dit" and name != "replicated":
                trainer.save(state, 0.0)  # step 2 on fsdp 4 x model 2: restored below on other topologies
                saved, resharding = _leaves(state), trainer
            states[name] = _leaves(_train(trainer, state, 1))
        out["max_diff"][f"{model}_{TRAINED[model]}"] = _max_diff(states[TRAINED[model]], states["replicated"])

    # Resharding restore: step 2 of the DiT restored on 4 devices (data 2 x fsdp 2) and on 1, then step 3 with
    # the same global batch, against step 3 taken on the 8 devices.
    reference = states[TRAINED["dit"]]
    out["restore"] = {}
    for devices, shape in ((4, {"data": 2, "fsdp": 2}), (1, None)):
        other = Trainer(resharding.config, resharding.workdir, mesh=make_mesh(jax.devices()[:devices], shape))
        restored = other.restore_or_init()
        restored_leaves = _leaves(restored)
        stepped = _leaves(_train(other, restored, 1))
        out["restore"][devices] = {
            "restored_equal": _max_diff(restored_leaves, saved) == 0.0,
            "mesh_sizes": sorted({x.sharding.mesh.devices.size for x in jax.tree.leaves(restored)}),
            "next_step_max_diff": _max_diff(stepped, reference),
        }

    # DiT-XL/2 (256x256 images as 32x32x4 latents, 1000 classes) with the recipe's Adam: abstract shapes only.
    model, tx = dit("XL/2", num_classes=1000), make_optimizer(resharding.config.optim, 10)
    x, t, y = jnp.zeros((1, 32, 32, 4)), jnp.ones((1,)), jnp.zeros((1,), jnp.int32)
    abstract = jax.eval_shape(
        lambda: TrainState.create(model.init(jax.random.key(0), x, t, y)["params"], tx, jax.random.key(1))
    )
    for name, shape in MESHES.items():
        shardings = state_shardings(abstract, make_mesh(shape=shape))
        placed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
        out["bytes"][f"dit_xl2_{name}"] = bytes_per_device((placed.params, placed.opt_state))
    out["dit_xl2_params"] = sum(x.size for x in jax.tree.leaves(abstract.params))
    return out


@pytest.fixture(scope="module")
def measured():
    # LLVM optimization level 0 halves the compile time of the eight train steps; float semantics are unchanged.
    flags = f"--xla_force_host_platform_device_count={DEVICES} --xla_backend_optimization_level=0"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS=flags)
    result = subprocess.run(
        [sys.executable, "-m", "tests.test_mesh"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("model", ["unet", "dit"])
def test_sharded_training_equals_data_parallel(measured, model):
    """Params, EMA and optimizer state after 3 steps on 8 devices: FSDP (U-Net), FSDP x model (DiT) vs replicated."""
    assert measured["max_diff"][f"{model}_{TRAINED[model]}"] < 1e-6, measured["max_diff"]


@pytest.mark.parametrize("model", ["unet", "dit"])
def test_one_rule_table_lays_out_parameters_ema_and_adam_moments(measured, model):
    """The qkv kernels of params, EMA, Adam's mu and nu: the tensor-parallel rule plus FSDP; default: replicated."""
    spec = measured["spec"]
    assert spec[f"{model}_replicated"]["replicated"]
    layers = 1 if model == "dit" else 4  # the U-Net's attention blocks: one down, one middle, two up
    assert spec[f"{model}_fsdp_model"]["qkv"] == ["P('fsdp', 'model')"] * 4 * layers, spec


@pytest.mark.parametrize("model", ["unet", "dit", "dit_xl2"])
def test_fsdp_holds_an_eighth_of_the_state_per_device(measured, model):
    """Bytes of parameters + optimizer state on the fullest device, from the arrays' shardings."""
    bytes_ = measured["bytes"]
    assert bytes_[f"{model}_fsdp"] <= 1.05 * bytes_[f"{model}_replicated"] / DEVICES, bytes_


@pytest.mark.parametrize("devices", ["4", "1"])
def test_checkpoint_restores_onto_another_topology(measured, devices):
    """Saved on 8 devices (fsdp 4 x model 2), restored on 4 (data 2 x fsdp 2) or 1: the same arrays, and the
    next step matches continuing on 8 devices to float32 rounding (a different mesh sums the gradient in
    another order, so it is not bitwise)."""
    restore = measured["restore"][devices]
    assert restore["restored_equal"] and restore["mesh_sizes"] == [int(devices)]
    assert restore["next_step_max_diff"] < 1e-6, restore


def test_partition_spec_fsdp_takes_the_largest_divisible_dimension():
    sizes = {"data": 1, "fsdp": 4, "model": 2}
    f32 = np.dtype(np.float32)
    assert partition_spec("params/conv/kernel", (3, 3, 16, 32), f32, sizes) == jax.P(None, None, None, FSDP_AXIS)
    assert partition_spec("params/x/bias", (6,), f32, sizes) == jax.P(None)  # 4 does not divide 6: replicated
    assert partition_spec("step", (), np.dtype(np.int32), sizes) == jax.P()
    assert partition_spec("rng", (4,), np.dtype(np.uint32), sizes) == jax.P()  # only floating-point arrays
    spec = partition_spec("params/block0/attention/proj/kernel", (64, 64), f32, sizes)
    assert spec == jax.P(MODEL_AXIS, FSDP_AXIS)
    assert partition_spec("params/block0/attention/proj/kernel", (64, 64), f32, {**sizes, "fsdp": 1, "model": 1}) == (
        jax.P(None, None)
    )
    with pytest.raises(ValueError, match="does not divide"):
        partition_spec("params/block0/mlp_in/kernel", (8, 5), f32, sizes)


def test_bad_mesh_batch_and_rules_fail_at_start_up():
    config = tiny_config("unet")
    assert mesh_shape(None, 8) == {"data": 8, "fsdp": 1, "model": 1}
    assert mesh_shape({"fsdp": -1, "model": 2}, 8) == {"data": 1, "fsdp": 4, "model": 2}
    config.mesh = {"data": 3, "fsdp": -1}
    with pytest.raises(ConfigError, match=r"config.mesh .* does not fit 8 devices"):
        check_config(config, device_count=8)
    config.mesh = {"data": -1, "tensor": 2}
    with pytest.raises(ConfigError, match="unknown axes"):
        check_config(config, device_count=8)
    config.mesh = {"data": 2, "fsdp": 2, "model": 2}
    config.train.batch_size = 6
    with pytest.raises(
        ConfigError, match=r"batch_size = 6 .* device count 4 on the batch axes \(mesh data x fsdp = 2 x 2"
    ):
        check_config(config, device_count=8)
    config.train.batch_size = 12  # a multiple of the 4 batch shards, not of the 8 devices: allowed
    check_config(config, device_count=8)
    config.partition_rules = ((r"mlp_in/kernel$", (None, "tensor")),)
    with pytest.raises(ConfigError, match=r"config.partition_rules: .* unknown mesh axes \['tensor'\]"):
        check_config(config, device_count=8)


if __name__ == "__main__":
    print(json.dumps(_run_on_8_devices()))
