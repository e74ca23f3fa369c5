"""The training job as an operator sees it: divergence, retention, preemption, ownership, damage, bad settings.

Each test reproduces one way a scheduler-run job used to lose or poison work, and checks
the job now ends cleanly: exit codes, what is on disk, and a bit-exact resume.
"""

import glob
import hashlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from difflax.data import make_dataset
from difflax.train import (
    Checkpointer,
    CheckpointError,
    ConfigError,
    RecipeMismatch,
    Trainer,
    TrainingDiverged,
    WorkdirBusy,
    WorkdirLock,
    shard_batch,
    train_and_evaluate,
)
from difflax.train.checkpoint import all_finite
from difflax.train.workdir import check_recipe
from tests.test_train import ROOT, _free_port, _params, _run_script, tiny_config

ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))


class NaNAfter:
    """The toy data, with NaN inputs from step ``first`` on (a run whose gradients go non-finite)."""

    def __init__(self, first: int):
        self.data = make_dataset("grid")
        self.first = first
        self.example_shape, self.num_classes = self.data.example_shape, self.data.num_classes

    def batch(self, seed, step, batch_size, process_index=0, process_count=1):
        batch = self.data.batch(seed, step, batch_size, process_index, process_count)
        return {**batch, "x": batch["x"] * np.nan} if step >= self.first else batch


def _restored(trainer, step):
    return trainer.checkpointer.restore(trainer.init_state(), step)[0]


def test_diverging_run_stops_and_never_saves_a_nonfinite_state(tmp_path):
    """Finding 1: NaN gradients from step 8 on. The old job applied the 4th one (optax gives up),
    saved NaN checkpoints and exited 0; now it stops after optim.max_nonfinite in a row, the
    checkpoints on disk are all finite, and the last good one (step 5) is kept."""
    config = tiny_config(steps=40, save_every=5)
    config.optim.max_nonfinite = 3
    trainer = Trainer(config, str(tmp_path), dataset=NaNAfter(first=7))
    with pytest.raises(TrainingDiverged, match=r"step 10 .*max_nonfinite = 3.*last good checkpoint is step 5"):
        trainer.run(progress=False)
    trainer.checkpointer.wait()
    assert trainer.checkpointer.all_steps() == [5]
    assert all_finite(_restored(trainer, 5))


def test_diverging_learning_rate_exits_nonzero_with_no_nonfinite_checkpoint(tmp_path):
    """Finding 1 as the probe ran it: a learning rate that diverges, through the entry point."""
    result = subprocess.run(
        [sys.executable, "-m", "difflax.cli.train", "--config=toy2d", f"--workdir={tmp_path}",
         "--config.optim.learning_rate=1e30", "--config.optim.warmup_steps=0", "--config.optim.grad_clip=0",
         "--config.optim.max_nonfinite=3", "--config.train.steps=40", "--config.train.save_every=1",
         "--config.train.log_every=1", "--config.model.kwargs.features=32"],
        cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: training diverged"), result.stderr[-2000:]
    config = ml_collections.ConfigDict(json.loads((tmp_path / "config.json").read_text()))  # the run's recipe
    trainer = Trainer(config, str(tmp_path))
    steps = trainer.checkpointer.all_steps()
    assert steps and max(steps) < 40, steps  # stopped early, with the good steps kept
    for step in steps:
        assert all_finite(_restored(trainer, step)), step


def test_retention_holds_across_restarts(tmp_path):
    """Finding 2: keep=2, keep_best=1 and three restarts keep at most 3 checkpoints (the old job
    kept every step saved before each restart: 9 here). Each restart is a new checkpoint manager
    reading the directory (the compiled step is reused, to keep the test fast)."""
    config = tiny_config(steps=18, save_every=2)
    config.train.keep, config.train.keep_best = 2, 1
    trainer = Trainer(config, str(tmp_path))
    for stop in (6, 12, 18):
        trainer.checkpointer = Checkpointer(str(tmp_path / "checkpoints"), keep=2, keep_best=1, async_save=False)
        trainer.run(stop_at=stop, progress=False)
        steps = trainer.checkpointer.all_steps()
        assert stop - 2 in steps and stop in steps and len(steps) <= 3, (stop, steps)
    metrics = sorted(glob.glob(str(tmp_path / "checkpoints" / "*" / "metrics" / "metrics")))
    assert len(metrics) == len(steps)  # the ranking metric is on disk with every kept step


def _wait_for(path, proc, deadline=300):
    start = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - start < deadline
        time.sleep(0.2)


def test_sigterm_at_startup_exits_zero_having_trained_nothing(tmp_path):
    """Finding 3: a notice while the job is still importing used to kill it (-15). The checkout's path
    runs the job's file as a script, so its handler is installed before JAX is imported."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.main", "--config=configs/toy2d.py", f"--workdir={tmp_path}",
         "--config.model.kwargs.features=32"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "preempted during training at step 0" in out
    assert not glob.glob(str(tmp_path / "checkpoints" / "[0-9]*"))


SIGTERM_SCRIPT = """
import os, signal, sys
import numpy as np, jax
import difflax.train.loop as loop
from difflax.data import make_dataset
from difflax.train import Trainer, train_and_evaluate
from tests.test_train import tiny_config

class SigtermAt:
    def __init__(self, step):
        self.data, self.step = make_dataset("grid"), step
        self.example_shape, self.num_classes = self.data.example_shape, self.data.num_classes
    def batch(self, seed, step, *args):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.data.batch(seed, step, *args)

config = tiny_config(steps=8, save_every=4)
workdir = sys.argv[1]
# 1. SIGTERM during step 4, which also writes the periodic checkpoint 4.
first = train_and_evaluate(config, workdir, dataset=SigtermAt(3))
steps = Trainer(config, workdir).checkpointer.all_steps()
print("first", first["preempted"], first["stage"], first["step"], steps)
# 2. SIGTERM during evaluation.
score = loop.score_samples
def interrupted(*args):
    os.kill(os.getpid(), signal.SIGTERM)
    return score(*args)
loop.score_samples = interrupted
second = train_and_evaluate(config, workdir)
loop.score_samples = score
print("second", second["preempted"], second["stage"], second["step"], os.path.exists(workdir + "/metrics.json"))
# 3. The rerun evaluates; the parameters equal an uninterrupted run's.
third = train_and_evaluate(config, workdir)
print("third", third.get("preempted", False), third["step"], os.path.exists(workdir + "/metrics.json"))
trainer = Trainer(config, workdir)
resumed = trainer.checkpointer.restore(trainer.init_state())[0]
plain, _ = Trainer(config, workdir + "-plain").run(progress=False)
same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(plain.params)))
print("bit_exact", same)
"""


def test_sigterm_on_a_save_step_and_during_evaluation_ends_cleanly(tmp_path):
    """Finding 3: SIGTERM on a step that also saves (used to exit 1, StepAlreadyExistsError) and
    during evaluation (used to die with -15) both return normally; the rerun resumes bit-exactly."""
    result = _run_script(SIGTERM_SCRIPT.replace("sys.argv[1]", repr(str(tmp_path / "run"))))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert lines["first"] == "True training 4 [4]", result.stdout
    assert lines["second"] == "True evaluation 8 False", result.stdout
    assert lines["third"] == "False 8 True", result.stdout
    assert lines["bit_exact"] == "True", result.stdout


MULTI_SCRIPT = """
import sys, jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize("127.0.0.1:{port}", 2, int(sys.argv[1]))
from difflax.train import train_and_evaluate
from tests.test_train import tiny_config
config = tiny_config(steps=100000, save_every=100000)
result = train_and_evaluate(config, "{workdir}")
print("result", jax.process_index(), result["preempted"], result["step"], flush=True)
# The checkpoint the two processes wrote, restored by both: a digest of every byte of the state.
import hashlib, numpy as np
from difflax.train import Trainer
state = Trainer(config, "{workdir}").restore_or_init()
digest = hashlib.sha256(b"".join(np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(state))).hexdigest()
print("digest", jax.process_index(), int(state.step), digest, flush=True)
# ... and the next step from it, the two processes each loading their half of the global batch.
from difflax.train import shard_batch
trainer = Trainer(config, "{workdir}")
batch = trainer.dataset.batch(config.seed, int(state.step), config.train.batch_size, jax.process_index(), 2)
following, _ = trainer._step(state, shard_batch(batch, trainer.mesh))
if jax.process_index() == 0:
    np.savez("{workdir}_next.npz", *[np.asarray(leaf) for leaf in jax.tree.leaves(following)])
jax.distributed.shutdown()
"""


def _digest(state):
    return hashlib.sha256(b"".join(np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(state))).hexdigest()


def test_sigterm_to_one_of_two_processes_stops_both_at_one_joint_step(tmp_path):
    """Finding 4: SIGTERM to process 1 of a 2-process job used to hang both. Now both stop at
    the same step, write one checkpoint jointly and exit 0; the checkpoint equals a
    single-process run to that step, one process restores it bit for bit as the two do, and its next step
    on one process is the two processes' next step (same global batch) to float32 rounding."""
    workdir = tmp_path / "multi"
    code = MULTI_SCRIPT.replace("{port}", str(_free_port())).replace("{workdir}", str(workdir))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        _wait_for(workdir / "metrics.jsonl", procs[0])
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    results = sorted(line.split()[1:] for out, _ in outs for line in out.splitlines() if line.startswith("result"))
    assert [r[0] for r in results] == ["0", "1"] and results[0][1:] == results[1][1:] and results[0][1] == "True"
    step = int(results[0][2])
    config = tiny_config(steps=100000, save_every=100000)
    multi = Trainer(config, str(workdir))
    assert multi.checkpointer.all_steps() == [step]
    # Written by 2 processes, restored by 1: bit for bit what the 2 processes restore, so the next step
    # from it is the step a 2-process continuation takes (same global batch, same state).
    digests = {tuple(line.split()[1:]) for out, _ in outs for line in out.splitlines() if line.startswith("digest")}
    assert {(i, s) for i, s, _ in digests} == {("0", str(step)), ("1", str(step))}
    assert {d for *_, d in digests} == {_digest(multi.restore_or_init())}
    # ... and the next step on 1 process equals the 2 processes' next step (to float32 rounding: the gradient
    # is summed over the batch in another order, as for 8 -> 1 devices in tests/test_mesh.py).
    batch = multi.dataset.batch(config.seed, step, config.train.batch_size)
    following, _ = multi._step(multi.restore_or_init(), shard_batch(batch, multi.mesh))
    saved = np.load(f"{workdir}_next.npz")
    leaves = jax.tree.leaves(following)
    assert int(following.step) == step + 1 and len(saved.files) == len(leaves)
    for i, leaf in enumerate(leaves):
        np.testing.assert_allclose(np.asarray(leaf), saved[f"arr_{i}"], rtol=0, atol=1e-6)
    single, _ = Trainer(config, str(tmp_path / "single")).run(stop_at=step, progress=False)
    for a, b in zip(_params(_restored(multi, step)), _params(single), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_second_job_on_a_busy_directory_is_refused(tmp_path):
    """Finding 5: the lock names the owner; a dead owner's (or an old foreign) lock is taken over."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = tmp_path / "LOCK"
        lock.write_text(f'{{"host": "{socket.gethostname()}", "pid": {sleeper.pid}, "started": {time.time()}}}')
        start = time.perf_counter()
        with pytest.raises(WorkdirBusy, match=f"in use by pid {sleeper.pid}"):
            train_and_evaluate(tiny_config(steps=2), str(tmp_path))
        assert time.perf_counter() - start < 5
        assert not (tmp_path / "checkpoints").exists()
        lock.write_text('{"host": "elsewhere", "pid": 1, "started": 0}')  # another host, heartbeat fresh
        with pytest.raises(WorkdirBusy, match="elsewhere"), WorkdirLock(str(tmp_path)):
            pass
    finally:
        sleeper.kill()
        sleeper.wait()
    os.utime(lock, (time.time() - 600, time.time() - 600))  # the foreign owner's heartbeat stopped
    with WorkdirLock(str(tmp_path)) as held:
        assert held.owned
    lock.write_text(f'{{"host": "{socket.gethostname()}", "pid": {sleeper.pid}, "started": 0}}')  # owner died
    with WorkdirLock(str(tmp_path)) as held:
        assert held.owned
    assert not lock.exists()  # released on exit


def test_a_changed_recipe_is_refused_on_resume(tmp_path):
    """Finding 5: another seed or learning rate used to resume the other run's checkpoints silently."""
    config = tiny_config(steps=2)
    Trainer(config, str(tmp_path)).run(progress=False)
    check_recipe(config, str(tmp_path), has_checkpoints=False)  # the run's config.json
    changed = tiny_config(steps=4)
    changed.seed, changed.optim.learning_rate = 1, 0.01
    expected = r"optim\.learning_rate: 0\.001 -> 0\.01; seed: 0 -> 1.*--allow_recipe_change"
    with pytest.raises(RecipeMismatch, match=expected):
        train_and_evaluate(changed, str(tmp_path))
    assert Trainer(config, str(tmp_path)).checkpointer.all_steps() == [2]  # nothing trained
    other = tiny_config(steps=2)
    other.name = "digits"
    with pytest.raises(RecipeMismatch, match="checkpoints of recipe 'toy2d', not 'digits'"):
        check_recipe(other, str(tmp_path), has_checkpoints=True)
    longer = tiny_config(steps=4)  # train.steps may change on resume
    check_recipe(longer, str(tmp_path), has_checkpoints=True)
    check_recipe(changed, str(tmp_path), has_checkpoints=True, allow_change=True)


def _flip_a_bit(step_dir):
    data = max(glob.glob(str(step_dir / "state" / "ocdbt.process_0" / "d" / "*")), key=os.path.getsize)
    raw = bytearray(open(data, "rb").read())
    raw[len(raw) // 2] ^= 0x10
    open(data, "wb").write(bytes(raw))
    return data


def test_damaged_latest_steps_fall_back_to_the_newest_intact_one(tmp_path, caplog):
    """Finding 6: a flipped bit used to load silently and an unreadable step stopped the job.
    Now step 15 (a flipped bit) and step 10 (an unreadable item) are detected, set aside
    with their bytes intact, and the job resumes from step 5 to the same parameters as a
    run never interrupted."""
    config = tiny_config(steps=20, save_every=5)
    config.train.keep = 3
    Trainer(config, str(tmp_path)).run(stop_at=15, progress=False)
    ckpts = tmp_path / "checkpoints"
    _flip_a_bit(ckpts / "15")
    (ckpts / "10" / "meta" / "metadata").write_text("garbage")
    damaged = {p.relative_to(ckpts): p.read_bytes() for s in ("10", "15") for p in (ckpts / s).rglob("*")
               if p.is_file()}
    trainer = Trainer(config, str(tmp_path))
    with caplog.at_level("WARNING"):
        state, _ = trainer.run(progress=False)
    warnings = caplog.text
    assert "checkpoint 15" in warnings and "do not match their saved checksums" in warnings
    assert "checkpoint 10" in warnings and "cannot be restored" in warnings
    assert trainer.checkpointer.all_steps() == [10, 15, 20]  # retrained and saved again
    aside = {}
    for path in (tmp_path / "checkpoints.damaged").rglob("*"):
        if path.is_file():
            rel = path.relative_to(tmp_path / "checkpoints.damaged")
            aside[rel.parts[0].split("-")[0] / rel.relative_to(rel.parts[0])] = path.read_bytes()
    assert {str(k): v for k, v in aside.items()} == {str(k): v for k, v in damaged.items()}
    plain, _ = Trainer(config, str(tmp_path / "plain")).run(progress=False)
    for a, b in zip(_params(state), _params(plain), strict=True):
        np.testing.assert_array_equal(a, b)

    steps = trainer.checkpointer.all_steps()
    for step in steps:
        _flip_a_bit(ckpts / str(step))
    expected = re.escape(f"restores (steps {steps[::-1]}, nothing was moved)")
    with pytest.raises(CheckpointError, match=expected):
        Trainer(config, str(tmp_path)).run(progress=False)
    assert Trainer(config, str(tmp_path)).checkpointer.all_steps() == steps


def _set(config, key, value):
    *path, last = key.split(".")
    node = config
    for part in path:
        node = node[part]
    with node.ignore_type():
        node[last] = value


BAD_SETTINGS = [
    ("seed", -1),
    ("data.name", "mnist"),
    ("data.image_size", 0),
    ("process.name", "vpp"),
    ("model.name", "resnet"),
    ("model.prediction", "noise"),
    ("model.noise_scale", 0.0),
    ("model.dtype", "float64"),
    ("model.remat", "all"),
    ("loss.weighting", "uniform"),
    ("loss.t_sampler", "beta"),
    ("loss.p_uncond", 1.0),
    ("optim.optimizer", "sgd"),
    ("optim.learning_rate", -1e-3),
    ("optim.learning_rate", 0.0),
    ("optim.learning_rate", math.nan),
    ("optim.schedule", "linear"),
    ("optim.warmup_steps", -5),
    ("optim.b2", 1.0),
    ("optim.eps", 0.0),
    ("optim.grad_clip", -1.0),
    ("optim.grad_accum", 0),
    ("optim.max_nonfinite", 0),
    ("train.steps", 0),
    ("train.steps", -10),
    ("train.batch_size", 0),
    ("train.ema_decay", 1.5),
    ("train.log_every", 0),
    ("train.save_every", 0),
    ("train.keep", 0),
    ("train.keep_best", -1),
    ("train.ema_warmup", "yes"),
    ("sample.solver", "dpm++"),
    ("sample.steps", 0),
    ("sample.grid", "cosine"),
    ("eval.num_samples", 0),
]


@pytest.mark.parametrize("key,value", BAD_SETTINGS, ids=[f"{k}={v}" for k, v in BAD_SETTINGS])
def test_bad_settings_are_refused_before_anything_is_built(tmp_path, key, value):
    """Finding 7: each bad value fails in one line naming the config key and the value, before
    data, model or work directory exist (several used to be accepted, divide by zero, or fail
    after the whole training run)."""
    config = tiny_config(steps=2)
    _set(config, key, value)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        train_and_evaluate(config, str(tmp_path / "run"))
    assert time.perf_counter() - start < 2
    message = str(err.value)
    assert f"config.{key} = {value!r}" in message and "\n" not in message, message
    assert not (tmp_path / "run").exists()


def test_settings_that_only_fail_together_are_refused(tmp_path):
    config = tiny_config(steps=2)
    config.process.kwargs.t_min = 2.0  # above t_max
    with pytest.raises(ConfigError, match=r"config\.process\.kwargs"):
        train_and_evaluate(config, str(tmp_path))
    config = tiny_config(steps=2)
    config.train.batch_size = 30
    with pytest.raises(ConfigError, match=r"config\.train\.batch_size = 30 .*multiple of the device count 8"):
        check_config_devices(config, 8)
    for name in ("cifar10_ddpmpp", "cifar10_edm", "digits", "imagenet256_dit_latent", "imagenet64_unet_cfg",
                 "toy2d", "toy2d_edm"):
        check_config_devices(__import__(f"difflax.configs.{name}", fromlist=["get_config"]).get_config(), 1)


def check_config_devices(config, devices):
    from difflax.train import check_config

    check_config(config, device_count=devices)


def test_entry_point_refuses_a_bad_setting_in_one_line(tmp_path):
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "difflax.cli.train", "--config=toy2d", f"--workdir={tmp_path / 'run'}",
         "--config.train.batch_size=0"], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300,
    )
    seconds = time.perf_counter() - start
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: config.train.batch_size = 0 is not allowed: it must be an integer >= 1."
    ], result.stderr[-2000:]
    assert not (tmp_path / "run").exists()
    print(f"refused in {seconds:.1f} s (process start and imports included)")


def test_sample_rejects_integer_noise_and_names_bad_scalars():
    """Finding 7, library side: an integer x_T used to give wrong samples silently."""
    import difflax
    from difflax.analytic import GaussianMixture

    process = difflax.VP()
    denoise = GaussianMixture.isotropic(np.array([[-2.0], [2.0]]), 0.5).denoiser(process)
    x_int = np.ones((4, 1), np.int32)
    for solver in ("dpmpp_2m", "ddim", "heun", "unipc", "adaptive"):
        with pytest.raises(TypeError, match="x_T must be a floating-point array; got int32"):
            difflax.sample(denoise, process, x_int, solver=solver, steps=4)
    with pytest.raises(TypeError, match="eta must be a number or an array; got 'a'"):
        difflax.sample(denoise, process, np.ones((4, 1), np.float32), solver="ddim", steps=4, eta="a")
    x, _ = difflax.sample(denoise, process, jax.numpy.ones((4, 1)), solver="ddim", steps=4, eta=0.0)
    assert np.isfinite(np.asarray(x)).all()
