"""The training loop: data, sharded steps, EMA, checkpoints, logs, samples, evaluation."""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import difflax
from difflax.data import make_dataset
from difflax.data.encode import dataset_decoder
from difflax.train import builders, plots
from difflax.train.checkpoint import Checkpointer
from difflax.train.config_checks import check_config
from difflax.train.optim import make_optimizer
from difflax.train.preemption import Preemption
from difflax.train.sharding import batch_sharding, make_mesh, partition_rules, replicated, shard_batch, state_shardings
from difflax.train.state import TrainState
from difflax.train.step import make_train_step
from difflax.train.throughput import peak_tflops, step_flops, throughput
from difflax.train.workdir import WorkdirLock, check_recipe

__all__ = ["MetricWriter", "Trainer", "TrainingDiverged", "evaluate", "train_and_evaluate"]


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


class TrainingDiverged(RuntimeError):
    """Too many updates in a row had non-finite gradients; nothing non-finite was saved."""


class Trainer:
    """Holds what one recipe needs to train and sample; :meth:`run` trains to ``train.steps``.

    ``dataset`` overrides the recipe's data with any object that has ``batch(seed, step,
    batch_size, process_index, process_count)``, ``example_shape`` and ``num_classes``
    (see :mod:`difflax.data.arrays`). ``preemption`` is the job's
    :class:`~difflax.train.preemption.Preemption` (default: a new one, installed while
    :meth:`run` runs). The recipe is checked (:func:`~difflax.train.config_checks.check_config`)
    before anything is built.

    The device mesh is ``mesh``, else ``config.mesh`` over all devices (default: all on
    ``data``; see :func:`~difflax.train.sharding.make_mesh`). Parameters, EMA and optimizer
    state are laid out by :attr:`state_sharding` (``config.partition_rules``, then the
    tensor-parallel rules and FSDP of :func:`~difflax.train.sharding.partition_spec`), the
    batch over ``data x fsdp``; the train step, sampling and evaluation are jitted with these
    shardings, and checkpoints restore onto them whatever mesh wrote them.
    """

    def __init__(self, config, workdir: str, mesh=None, dataset=None, preemption: Preemption | None = None):
        mesh_config = config.get("mesh", None)
        self.mesh = make_mesh(shape=None if mesh_config is None else dict(mesh_config)) if mesh is None else mesh
        check_config(config, mesh=self.mesh)
        self.config = config
        self.workdir = workdir
        self.is_main = jax.process_index() == 0
        if dataset is None:
            dataset = make_dataset(config.data.name, "train", config.data.get("image_size"))
        self.dataset = dataset
        self.num_classes = self.dataset.num_classes
        self.example_shape = tuple(self.dataset.example_shape)
        self.decode = dataset_decoder(config.data.name)  # latents -> images for pictures, or None
        self.process = builders.build_process(config.process)
        self.model = builders.build_model(config.model, self.num_classes)
        self.tx = make_optimizer(config.optim, config.train.steps)
        self.rules = partition_rules(config.get("partition_rules", None))
        self.state_sharding = state_shardings(jax.eval_shape(self._new_state), self.mesh, self.rules)
        step_fn = make_train_step(self.model, self.process, self.tx, config, self.num_classes)
        self._step = jax.jit(
            step_fn,
            in_shardings=(self.state_sharding, batch_sharding(self.mesh)),
            out_shardings=(self.state_sharding, replicated(self.mesh)),
            donate_argnums=0,
        )
        self.checkpointer = Checkpointer(
            os.path.join(workdir, "checkpoints"),
            keep=config.train.keep,
            keep_best=config.train.keep_best,
            async_save=config.train.get("async_checkpoint", True),
        )
        self.writer = MetricWriter(workdir, self.is_main)
        self.preemption = Preemption() if preemption is None else preemption
        self._snapshot_fn = None
        self._flops = None  # of one train step (difflax.train.throughput), found at the first log
        self._peak = peak_tflops(jax.devices()[0].device_kind)

    # ---------------------------------------------------------------- state
    def _new_state(self) -> TrainState:
        key = jax.random.key(self.config.seed)
        conditional = self.config.model.get("class_conditional", False)
        params = builders.init_params(self.model, jax.random.fold_in(key, 1), self.example_shape, conditional)
        return TrainState.create(params, self.tx, jax.random.fold_in(key, 2))

    def init_state(self) -> TrainState:
        """A new state laid out by :attr:`state_sharding`.

        A sharded layout is created in place by one jitted program, so no device ever holds
        more than its shards; a replicated one (the default mesh) is computed op by op and
        then placed, which keeps the initial values of earlier versions bit for bit (the
        fused program rounds a few initializers differently, by about one float32 ulp).
        """
        if all(s.is_fully_replicated for s in jax.tree.leaves(self.state_sharding)):
            return jax.device_put(self._new_state(), self.state_sharding)
        return jax.jit(self._new_state, out_shardings=self.state_sharding)()

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and :attr:`state_sharding` of the state, nothing allocated: the target of a restore."""
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            jax.eval_shape(self._new_state),
            self.state_sharding,
        )

    def restore_or_init(self) -> TrainState:
        """The newest intact checkpoint (see :meth:`Checkpointer.restore_intact`) on this mesh, else a new state."""
        latest = self.checkpointer.latest_step()
        if latest is None:
            return self.init_state()
        meta = self.checkpointer.read_meta(latest)
        if meta is not None and meta.get("example_shape") != list(self.example_shape):
            raise ValueError(
                f"checkpoints in {self.checkpointer.directory} were written for data of shape "
                f"{meta.get('example_shape')}, but the recipe's data has shape {list(self.example_shape)}; "
                "use another --workdir."
            )
        restored, _ = self.checkpointer.restore_intact(self.abstract_state())
        return restored

    def save(self, state: TrainState, loss: float):
        """Checkpoint ``state`` ranked by ``loss`` (refused if the state is not finite)."""
        step = int(state.step)
        meta = {"step": step, "example_shape": list(self.example_shape), "config": self.config.to_json_best_effort()}
        metric = float(loss) if math.isfinite(loss) else math.inf
        self.checkpointer.save(step, state, meta, metrics={"loss": metric})

    # ---------------------------------------------------------------- loop
    def snapshot(self, state: TrainState) -> str:
        """Write ``samples/step_<step>.png``: samples of the EMA parameters (one fixed key), beside real data."""
        if self._snapshot_fn is None:
            conditional = self.config.model.get("class_conditional", False)
            num = 10 * (self.num_classes if conditional else 8) if len(self.example_shape) > 1 else 1000
            self._snapshot_fn = jax.jit(
                lambda params, key: self.sample(params, key, num)[0],
                in_shardings=(self.state_sharding.ema_params, replicated(self.mesh)),
            )
        x = np.asarray(jax.device_get(self._snapshot_fn(state.ema_params, jax.random.key(self.config.seed + 2))))
        step = int(state.step)
        path = os.path.join(self.workdir, "samples", f"step_{step:07d}.png")
        if self.is_main:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_samples(self, x, path, f"{self.config.data.name}, step {step}: {self.config.sample.solver}")
        return path

    def _record(self, done: int, metrics, rate: float, history: list) -> dict:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        values["steps_per_sec"] = rate
        devices = self.mesh.devices.size
        values.update(throughput(rate, self.config.train.batch_size, self._flops, devices, self._peak))
        history.append({"step": done, **values})
        self.writer.write(done, values)
        limit = self.config.optim.max_nonfinite
        if values.get("nonfinite_in_a_row", 0) >= limit:
            latest = self.checkpointer.latest_step()
            raise TrainingDiverged(
                f"training diverged: the last {int(values['nonfinite_in_a_row'])} updates up to step {done} had "
                f"non-finite gradients (config.optim.max_nonfinite = {limit}); they were skipped and nothing "
                f"non-finite was saved. The last good checkpoint is step {latest} in {self.checkpointer.directory}. "
                "Lower config.optim.learning_rate, clip gradients (config.optim.grad_clip) or check the data."
            )
        return values

    def run(self, state: TrainState | None = None, *, stop_at: int | None = None, progress: bool = True):
        """Train from the newest intact checkpoint (or ``state``) to ``train.steps`` (or ``stop_at``).

        Saves every ``train.save_every`` steps and at the end, and writes a sample grid
        (:meth:`snapshot`) every ``eval.every`` steps (0: never). When :attr:`preemption` says
        so (SIGTERM; in a multi-process job at a step all processes agree on) it saves the
        current step, unless it is saved already, and returns early with ``preempted=True``.
        Raises :class:`TrainingDiverged` after ``optim.max_nonfinite`` non-finite updates in
        a row (checked whenever metrics are logged and before every save).
        """
        cfg = self.config.train
        state = self.restore_or_init() if state is None else state
        start = saved = int(state.step)
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        every = self.config.eval.get("every", 0)
        installed = not self.preemption.installed
        self.preemption.install()
        bar = tqdm(total=end, initial=start, desc="train", unit="step", disable=not (progress and self.is_main))
        history, preempted, metrics = [], False, None
        tick, ticks = time.perf_counter(), 0
        try:
            for step in range(start, end):
                if self.preemption.reached(step):
                    preempted = True
                    break
                batch = self.dataset.batch(
                    self.config.seed, step, cfg.batch_size, jax.process_index(), jax.process_count()
                )
                batch = shard_batch(batch, self.mesh)
                state, metrics = self._step(state, batch)
                ticks += 1
                done = step + 1
                saving = done % cfg.save_every == 0 or done == end
                if done % cfg.log_every == 0 or saving:
                    if self._flops is None:  # traced again, not compiled: the step's FLOPs by cost analysis
                        self._flops = step_flops(self._step.lower(state, batch))
                    now = time.perf_counter()
                    values = self._record(done, metrics, ticks / (now - tick), history)
                    tick, ticks = now, 0
                    bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_sec']:.0f}",
                                    mfu=f"{values['mfu']:.1%}" if "mfu" in values else "unknown")
                    if saving:
                        self.save(state, values["loss"])
                        saved = done
                if every and done % every == 0 and done != end:
                    self.snapshot(state)
                bar.update(1)
            if preempted and int(state.step) != saved:
                values = self._record(int(state.step), metrics, ticks / (time.perf_counter() - tick), history)
                self.save(state, values["loss"])
        finally:
            self.checkpointer.wait()  # saves in flight hold good states: let them finish, even on error
            bar.close()
            if installed:
                self.preemption.uninstall()
        return state, {"preempted": preempted, "history": history}

    # ---------------------------------------------------------------- sampling
    def denoiser(self, params, guidance_scale=None):
        """The trained network as a denoiser: ``denoise(x, t)``, or ``denoise(x, t, y)`` if class-conditional.

        A class-conditional one is guided by classifier-free guidance
        (:func:`difflax.guidance.cfg`, scale ``gamma``, null class ``num_classes``) when
        ``guidance_scale`` (default ``sample.guidance_scale``, else 1: no guidance) is not 1.
        """
        scale = self.config.sample.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale

        def given(y):
            return builders.make_denoiser(
                self.model,
                params,
                self.process,
                self.config.model.prediction,
                y,
                noise_scale=self.config.model.get("noise_scale", 1.0),
            )

        if not self.config.model.get("class_conditional", False):
            return given(None)
        if scale == 1.0:
            return lambda x, t, y: given(y)(x, t)
        return lambda x, t, y: difflax.guidance.cfg(
            lambda x_, t_, y_: given(y_)(x_, t_), y, scale, null=self.num_classes
        )(x, t)

    def sample(
        self,
        params,
        key,
        num: int,
        labels=None,
        solver=None,
        steps=None,
        grid=None,
        guidance_scale=None,
        return_trajectory: bool = False,
    ):
        """Draw ``num`` samples with the recipe's sampler (``sample.*``, each overridable); returns ``(x, info)``.

        A class-conditional model samples the classes ``0, 1, ..., num_classes - 1, 0, ...``
        unless ``labels`` are given, guided as in :meth:`denoiser`.
        """
        cfg = self.config.sample
        solver = solver or cfg.solver
        steps = steps or cfg.steps
        grid = grid or cfg.grid
        k_noise, k_solver = jax.random.split(key)
        denoise = self.denoiser(params, guidance_scale)
        if self.config.model.get("class_conditional", False):
            labels = jnp.arange(num) % self.num_classes if labels is None else labels
            given_labels = denoise

            def denoise(x, t):
                return given_labels(x, t, labels)

        x_T = self.process.prior_sample(k_noise, (num, *self.example_shape))
        stochastic = difflax.solvers.get_solver(solver).stochastic
        return difflax.sample(
            denoise,
            self.process,
            x_T,
            solver=solver,
            steps=steps,
            grid=grid,
            key=k_solver if stochastic else None,
            return_trajectory=return_trajectory,
        )


def train_and_evaluate(
    config, workdir: str, *, dataset=None, preemption: Preemption | None = None, allow_recipe_change: bool = False
) -> dict:
    """The training job: check the recipe, own ``workdir``, train, then sample and evaluate.

    In order, before anything is built: :func:`~difflax.train.config_checks.check_config`,
    the work-directory lock (:class:`~difflax.train.workdir.WorkdirLock`), and the recipe
    check against the run's ``config.json``
    (:func:`~difflax.train.workdir.check_recipe`, skipped with ``allow_recipe_change``).
    Then :meth:`Trainer.run`, and :func:`evaluate`, which writes ``samples.png``,
    ``loss.png`` and ``metrics.json``. ``preemption`` (default: one installed for the
    call) stops the job cleanly at any point: the result is then ``{"preempted": True, ...}``.
    ``dataset`` replaces the recipe's data (see :class:`Trainer`).
    """
    check_config(config, device_count=jax.device_count())
    os.makedirs(workdir, exist_ok=True)
    owned = preemption is None
    preemption = (Preemption() if owned else preemption).install()
    try:
        with WorkdirLock(workdir):
            checkpoints = os.path.join(workdir, "checkpoints")
            has_checkpoints = os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints))
            check_recipe(config, workdir, has_checkpoints=has_checkpoints, allow_change=allow_recipe_change)
            trainer = Trainer(config, workdir, dataset=dataset, preemption=preemption)
            state, status = trainer.run()
            if status["preempted"]:
                return {"preempted": True, "stage": "training", "step": int(state.step)}
            results = evaluate(trainer, state)
            if results.get("preempted"):
                return results
            if trainer.is_main:
                with open(os.path.join(workdir, "metrics.json"), "w") as f:
                    json.dump(results, f, indent=2)
                plots.loss_curve(trainer.writer.read(), os.path.join(workdir, "loss.png"))
            return results
    finally:
        if owned:
            preemption.uninstall()


def evaluate(trainer: Trainer, state: TrainState) -> dict:
    """Sample with the EMA parameters and score the samples.

    Returns ``{"preempted": True, ...}`` without scoring when the job was asked to stop
    (checked before sampling, after sampling and after scoring); the training state is
    already saved.
    """
    config = trainer.config
    stopped = {"preempted": True, "stage": "evaluation", "step": int(state.step)}
    if trainer.preemption.requested():
        return stopped
    key = jax.random.key(config.seed + 1)
    num = config.eval.num_samples
    conditional = config.model.get("class_conditional", False)
    labels = jnp.arange(num) % trainer.num_classes if conditional else None
    sample_fn = jax.jit(
        lambda p, k: trainer.sample(p, k, num, labels=labels),
        in_shardings=(trainer.state_sharding.ema_params, replicated(trainer.mesh)),
    )
    x, info = sample_fn(state.ema_params, key)
    x = np.asarray(jax.device_get(x))
    if trainer.preemption.requested():
        return stopped
    results = {
        "step": int(state.step),
        "final_loss": trainer.writer.read()[-1]["loss"] if trainer.writer.read() else None,
        "sampler": {
            "solver": config.sample.solver,
            "steps": config.sample.steps,
            "grid": config.sample.grid,
            "nfe": int(info["nfe"]),
        },
    }
    results.update(score_samples(trainer, x, None if labels is None else np.asarray(labels)))
    if trainer.preemption.requested():
        return stopped
    if trainer.is_main:
        write_samples(
            trainer,
            x,
            os.path.join(trainer.workdir, "samples.png"),
            f"{config.data.name}, step {int(state.step)}: {config.sample.solver}, NFE {int(info['nfe'])}",
        )
    return results


def write_samples(trainer: Trainer, x: np.ndarray, path: str, title: str) -> None:
    """``samples.png``-style figure: all 2-D points, or up to 10 rows of images beside as many real ones.

    A class-conditional model's samples cycle through the classes, so with ``num_classes``
    columns each column is one class; the real images are laid out the same way. Latent data
    with a recorded VAE is shown decoded (samples and real latents alike).
    """
    conditional = trainer.config.model.get("class_conditional", False)
    cols = trainer.num_classes if conditional else None
    if x.ndim == 2:
        real = trainer.dataset.batch(trainer.config.seed + 7, 10**6, len(x))["x"]
        plots.sample_grid(x, np.asarray(real), path, title)
        return
    cols = cols or 8
    x = x[: 10 * cols]
    pool = trainer.dataset.batch(trainer.config.seed, 0, 20 * len(x))
    if conditional:
        order = [np.flatnonzero(np.asarray(pool["y"]) == c) for c in range(cols)]
        rows = min(len(x) // cols, *(len(o) for o in order))
        real = np.stack([pool["x"][order[c][r]] for r in range(rows) for c in range(cols)])
    else:
        real = pool["x"][: len(x)]
    if trainer.decode is not None:
        x, real = trainer.decode(x), trainer.decode(real)
    plots.sample_grid(x, np.asarray(real), path, title, cols=cols)


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
