"""The training loop: data, sharded steps, EMA, checkpoints, logs, samples, evaluation."""

from __future__ import annotations

import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import difflax
from difflax.data import make_dataset
from difflax.train import builders, plots
from difflax.train.checkpoint import Checkpointer
from difflax.train.optim import make_optimizer
from difflax.train.sharding import make_mesh, replicated, shard_batch
from difflax.train.state import TrainState
from difflax.train.step import make_train_step

__all__ = ["MetricWriter", "Trainer", "train_and_evaluate"]


class MetricWriter:
    """JSON lines in ``workdir/metrics.jsonl`` and, where tensorboardX is installed, TensorBoard events."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, values: dict):
        if not self.enabled:
            return
        values = {k: float(v) for k, v in values.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), **values}) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)

    def read(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]


class Trainer:
    """Holds what one recipe needs to train and sample; :meth:`run` trains to ``train.steps``.

    ``dataset`` overrides the recipe's data with any object that has ``batch(seed, step,
    batch_size, process_index, process_count)``, ``example_shape`` and ``num_classes``
    (see :mod:`difflax.data.arrays`).
    """

    def __init__(self, config, workdir: str, mesh=None, dataset=None):
        self.config = config
        self.workdir = workdir
        self.is_main = jax.process_index() == 0
        if dataset is None:
            dataset = make_dataset(config.data.name, "train", config.data.get("image_size"))
        self.dataset = dataset
        self.num_classes = self.dataset.num_classes
        self.example_shape = tuple(self.dataset.example_shape)
        self.process = builders.build_process(config.process)
        self.model = builders.build_model(config.model, self.num_classes)
        self.tx = make_optimizer(config.optim, config.train.steps)
        self.mesh = make_mesh() if mesh is None else mesh
        step_fn = make_train_step(self.model, self.process, self.tx, config, self.num_classes)
        rep = replicated(self.mesh)
        self._step = jax.jit(step_fn, in_shardings=(rep, None), out_shardings=(rep, rep), donate_argnums=0)
        self.checkpointer = Checkpointer(
            os.path.join(workdir, "checkpoints"),
            keep=config.train.keep,
            keep_best=config.train.keep_best,
            async_save=config.train.get("async_checkpoint", True),
        )
        self.writer = MetricWriter(workdir, self.is_main)
        self._preempted = False

    # ---------------------------------------------------------------- state
    def init_state(self) -> TrainState:
        key = jax.random.key(self.config.seed)
        conditional = self.config.model.get("class_conditional", False)
        params = builders.init_params(self.model, jax.random.fold_in(key, 1), self.example_shape, conditional)
        state = TrainState.create(params, self.tx, jax.random.fold_in(key, 2))
        return jax.device_put(state, replicated(self.mesh))

    def restore_or_init(self) -> TrainState:
        state = self.init_state()
        if self.checkpointer.latest_step() is None:
            return state
        restored, meta = self.checkpointer.restore(state)
        if meta.get("example_shape") != list(self.example_shape):
            raise ValueError(
                f"checkpoints in {self.checkpointer.directory} were written for data of shape "
                f"{meta.get('example_shape')}, but the recipe's data has shape {list(self.example_shape)}; "
                "use another --workdir."
            )
        return jax.device_put(restored, replicated(self.mesh))

    def save(self, state: TrainState, metrics: dict | None = None, force: bool = False):
        step = int(state.step)
        meta = {"step": step, "example_shape": list(self.example_shape), "config": self.config.to_json_best_effort()}
        self.checkpointer.save(step, state, meta, metrics=metrics, force=force)

    # ---------------------------------------------------------------- loop
    def _on_sigterm(self, signum, frame):
        self._preempted = True

    def run(self, state: TrainState | None = None, *, stop_at: int | None = None, progress: bool = True):
        """Train from the latest checkpoint (or ``state``) to ``train.steps`` (or ``stop_at``).

        On SIGTERM the loop saves a checkpoint at the current step and returns early with
        ``preempted=True``.
        """
        cfg = self.config.train
        state = self.restore_or_init() if state is None else state
        start = int(state.step)
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if self.is_main_thread() else None
        bar = tqdm(total=end, initial=start, desc="train", unit="step", disable=not (progress and self.is_main))
        history = []
        tick, ticks = time.perf_counter(), 0
        try:
            for step in range(start, end):
                batch = self.dataset.batch(
                    self.config.seed, step, cfg.batch_size, jax.process_index(), jax.process_count()
                )
                state, metrics = self._step(state, shard_batch(batch, self.mesh))
                ticks += 1
                done = step + 1
                if done % cfg.log_every == 0 or done == end:
                    metrics = jax.device_get(metrics)
                    now = time.perf_counter()
                    rate = ticks / (now - tick)
                    tick, ticks = now, 0
                    values = {**metrics, "steps_per_sec": rate}
                    history.append({"step": done, **values})
                    self.writer.write(done, values)
                    bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", steps_s=f"{rate:.1f}")
                bar.update(1)
                if done % cfg.save_every == 0 and done != end:
                    self.save(state, {"loss": float(jax.device_get(metrics["loss"]))})
                if self._preempted:
                    break
            if end > start:  # a run resumed at its end has nothing new to save
                self.save(state, {"loss": float(jax.device_get(metrics["loss"]))}, force=True)
            self.checkpointer.wait()
        finally:
            bar.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return state, {"preempted": self._preempted, "history": history}

    @staticmethod
    def is_main_thread() -> bool:
        import threading

        return threading.current_thread() is threading.main_thread()

    # ---------------------------------------------------------------- sampling
    def sample(self, params, key, num: int, labels=None, solver=None, steps=None, grid=None):
        """Draw ``num`` samples with the recipe's sampler; returns ``(x, info)``."""
        cfg = self.config.sample
        solver = solver or cfg.solver
        steps = steps or cfg.steps
        grid = grid or cfg.grid
        k_noise, k_solver = jax.random.split(key)
        conditional = self.config.model.get("class_conditional", False)
        if conditional and labels is None:
            labels = jnp.arange(num) % self.num_classes
        denoise = builders.make_denoiser(
            self.model, params, self.process, self.config.model.prediction,
            labels if conditional else None, noise_scale=self.config.model.get("noise_scale", 1.0),
        )
        x_T = self.process.prior_sample(k_noise, (num, *self.example_shape))
        stochastic = difflax.solvers.get_solver(solver).stochastic
        return difflax.sample(denoise, self.process, x_T, solver=solver, steps=steps, grid=grid,
                              key=k_solver if stochastic else None)


def train_and_evaluate(config, workdir: str) -> dict:
    """Train a recipe, then sample, evaluate and write ``samples.png``, ``loss.png`` and ``metrics.json``."""
    os.makedirs(workdir, exist_ok=True)
    trainer = Trainer(config, workdir)
    state, status = trainer.run()
    if status["preempted"]:
        return {"preempted": True, "step": int(state.step)}
    results = evaluate(trainer, state)
    if trainer.is_main:
        with open(os.path.join(workdir, "metrics.json"), "w") as f:
            json.dump(results, f, indent=2)
        plots.loss_curve(trainer.writer.read(), os.path.join(workdir, "loss.png"))
    return results


def evaluate(trainer: Trainer, state: TrainState) -> dict:
    """Sample with the EMA parameters and score the samples."""
    config = trainer.config
    key = jax.random.key(config.seed + 1)
    num = config.eval.num_samples
    conditional = config.model.get("class_conditional", False)
    labels = jnp.arange(num) % trainer.num_classes if conditional else None
    sample_fn = jax.jit(lambda p, k: trainer.sample(p, k, num, labels=labels))
    x, info = sample_fn(state.ema_params, key)
    x = np.asarray(jax.device_get(x))
    results = {
        "step": int(state.step),
        "final_loss": trainer.writer.read()[-1]["loss"] if trainer.writer.read() else None,
        "sampler": {"solver": config.sample.solver, "steps": config.sample.steps, "grid": config.sample.grid,
                    "nfe": int(info["nfe"])},
    }
    results.update(score_samples(trainer, x, None if labels is None else np.asarray(labels)))
    if trainer.is_main:
        real = trainer.dataset.batch(config.seed, 0, min(num, 64))["x"]
        plots.sample_grid(x[:64], real, os.path.join(trainer.workdir, "samples.png"),
                          title=f"{config.data.name}: {config.sample.solver}, NFE {int(info['nfe'])}")
    return results


def score_samples(trainer: Trainer, x: np.ndarray, labels=None) -> dict:
    """Dataset-appropriate scores of samples against held-out data.

    Digits: the Frechet digits distance (features of difflax's own digits classifier,
    :mod:`difflax.metrics.digits`) to the held-out test digits, beside the same distance for
    the real training digits (the floor a perfect model reaches at this sample size), and the
    classifier's accuracy on class-conditional samples. Other data: the sliced Wasserstein
    distance to fresh data.
    """
    name = trainer.config.data.name
    if name == "digits":
        from difflax.data import load_digits
        from difflax.metrics.digits import frechet_digits_distance, load_or_train_digits_classifier

        train, train_labels = load_digits("train")
        test, test_labels = load_digits("test")
        clf = load_or_train_digits_classifier((train, train_labels, test, test_labels), trainer.workdir)
        reference = clf.stats(test)
        out = {
            "fdd": frechet_digits_distance(x, clf, reference),
            "fdd_real_train_digits": frechet_digits_distance(train[: len(x)], clf, reference),
            "digits_classifier_test_accuracy": clf.test_accuracy,
        }
        if labels is not None:
            out["class_accuracy"] = clf.accuracy(x, labels)
        return out
    from difflax.metrics.sample_based import sliced_wasserstein

    fresh = trainer.dataset.batch(trainer.config.seed + 7, 10**6, len(x))["x"]
    return {"sliced_wasserstein": float(sliced_wasserstein(jnp.asarray(x), jnp.asarray(fresh), key=jax.random.key(0)))}
