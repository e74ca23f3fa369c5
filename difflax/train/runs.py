"""A finished (or running) training run, read back from its work directory: sample it, evaluate it.

A run's directory holds ``config.json`` (the resolved recipe, written when the job starts)
and ``checkpoints/``; :func:`load_run` rebuilds the recipe's :class:`~difflax.train.loop.Trainer`
and restores a checkpoint (verified against its checksums), so sampling
(:func:`sample_run`, ``difflax-sample``) and evaluation (:func:`evaluate_run`,
``difflax-evaluate``) use exactly the model that was trained.

Evaluation is the seeded protocol of :func:`difflax.metrics.evaluate.evaluate` (mean +- std
over seeds) in the features of the run's data:

* **digits**: features of difflax's digits classifier (:mod:`difflax.metrics.digits`):
  Frechet digits distance (``fd``) to the held-out test digits, KID and precision / recall /
  density / coverage against them, and class accuracy of class-conditional samples.
* **2-D toy data**: the points themselves: Frechet distance, KID, precision / recall and
  the sliced Wasserstein distance to fresh data.
* **other images** (tfds): FID with local Inception weights (see
  :func:`difflax.metrics.inception.load_inception`) against reference statistics.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from difflax.metrics import stats as stats_lib
from difflax.metrics.evaluate import evaluate
from difflax.solvers import make_grid
from difflax.train import plots
from difflax.train.checkpoint import CheckpointError
from difflax.train.config_checks import ConfigError, check_config
from difflax.train.loop import Trainer, write_samples
from difflax.train.state import TrainState
from difflax.train.workdir import CONFIG

__all__ = ["evaluate_run", "load_config", "load_run", "sample_run"]


def _tuples(value):
    """JSON lists back to the tuples recipes use (hashable module attributes)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The recipe a run was trained with (``workdir/config.json``)."""
    path = os.path.join(workdir, CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: --workdir must be the directory of a training run "
                                "(difflax-train writes config.json there when it starts).")
    with open(path) as f:
        return ml_collections.ConfigDict(_tuples(json.load(f)))


def load_run(workdir: str, step: int | str = "latest") -> tuple[Trainer, TrainState]:
    """``(trainer, state)`` of the run in ``workdir`` at ``step``: ``"latest"``, ``"best"`` or a number."""
    trainer = Trainer(load_config(workdir), workdir)
    ckpt = trainer.checkpointer
    steps = ckpt.all_steps()
    if not steps:
        raise CheckpointError(f"the run in {workdir} has no checkpoint yet.")
    if step == "latest":
        chosen = steps[-1]
    elif step == "best":
        chosen = ckpt.best_step()
        if chosen is None:
            raise CheckpointError(f"the run in {workdir} keeps no best checkpoint (train.keep_best = 0).")
    else:
        try:
            chosen = int(step)
        except ValueError:
            raise ValueError(f"step must be 'latest', 'best' or a step number; got {step!r}.") from None
        if chosen not in steps:
            raise CheckpointError(f"the run in {workdir} has no checkpoint {chosen}; it has {steps}.")
    state, _ = ckpt.restore(trainer.init_state(), chosen)
    return trainer, state


def _with_sampler(config, solver, steps, grid, guidance_scale):
    """A copy of ``config`` with the given ``sample.*`` overrides, checked."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for key, value in (("solver", solver), ("steps", steps), ("grid", grid), ("guidance_scale", guidance_scale)):
            if value is not None:
                config.sample[key] = value
    check_config(config)
    return config


def sample_run(workdir: str, step="latest", *, solver=None, steps=None, grid=None, guidance_scale=None,
               num: int = 100, seed: int = 0, trajectory: bool = False) -> dict:
    """Sample ``num`` points from the run in ``workdir``; returns the paths written.

    The ``.npz`` holds the samples ``x`` (and ``labels`` of a class-conditional run). A run on
    ``latents:<dir>`` encoded with a recorded VAE (:func:`difflax.data.encode.encode_dataset`) also
    gets its samples decoded, ``images`` in the ``.npz``, and the PNG shows the decoded images.
    """
    trainer, state = load_run(workdir, step)
    config = _with_sampler(trainer.config, solver, steps, grid, guidance_scale)
    if num < 1:
        raise ConfigError(f"--num = {num} is not allowed: it must be an integer >= 1.")
    cfg = config.sample
    draw = jax.jit(lambda params, key: trainer.sample(
        params, key, num, solver=cfg.solver, steps=cfg.steps, grid=cfg.grid,
        guidance_scale=cfg.get("guidance_scale", 1.0), return_trajectory=trajectory))
    x, info = draw(state.ema_params, jax.random.key(seed))
    x = np.asarray(jax.device_get(x))
    name = f"step{int(state.step)}_{cfg.solver}{cfg.steps}_seed{seed}"
    out = os.path.join(workdir, "samples")
    os.makedirs(out, exist_ok=True)
    paths = {"png": os.path.join(out, f"{name}.png"), "npz": os.path.join(out, f"{name}.npz")}
    conditional = config.model.get("class_conditional", False)
    labels = np.arange(num) % trainer.num_classes if conditional else None
    images = None if trainer.decode is None else trainer.decode(x)
    np.savez(paths["npz"], x=x, **({} if labels is None else {"labels": labels}),
             **({} if images is None else {"images": images}))
    scale = cfg.get("guidance_scale", 1.0)
    guided = f", guidance {scale:g}" if config.model.get("class_conditional", False) and scale != 1.0 else ""
    write_samples(trainer, x, paths["png"], f"{config.data.name}, step {int(state.step)}: {cfg.solver}, "
                                            f"NFE {int(info['nfe'])}{guided}")
    if trajectory:
        paths["gif"] = os.path.join(out, f"{name}.gif")
        frames = np.asarray(jax.device_get(info["trajectory"]))
        times = np.asarray(make_grid(cfg.grid, trainer.process, cfg.steps))
        cols = trainer.num_classes if conditional else None
        plots.trajectory_gif(frames[:, : 10 * (cols or 8)] if frames.ndim > 3 else frames, times, paths["gif"],
                             cols=cols)
    return paths


def _protocol(trainer, inception, reference_stats) -> dict:
    """Feature function and references of the run's data (see the module docstring)."""
    name = trainer.config.data.name
    if name == "digits":
        from difflax.data import load_digits
        from difflax.metrics.digits import load_or_train_digits_classifier

        train, train_labels = load_digits("train")
        test, test_labels = load_digits("test")
        clf = load_or_train_digits_classifier((train, train_labels, test, test_labels), trainer.workdir)
        conditional = trainer.config.model.get("class_conditional", False)
        return {"feature_fn": clf.features, "reference_stats": clf.stats(test),
                "reference_features": np.asarray(clf.features(test)), "kid": True, "prdc": True,
                "classifier_fn": clf.logits if conditional else None}
    if len(trainer.example_shape) == 1:
        from difflax.metrics.sample_based import sliced_wasserstein

        fresh = np.asarray(trainer.dataset.batch(trainer.config.seed + 7, 10**6, 5000)["x"])

        def swd(features):
            return sliced_wasserstein(jnp.asarray(features), jnp.asarray(fresh), key=jax.random.key(0))

        return {"feature_fn": lambda x: x, "reference_stats": stats_lib.to_host(stats_lib.batch_stats(fresh)),
                "reference_features": fresh, "kid": True, "prdc": True, "feature_metrics": {"sliced_wasserstein": swd}}
    if inception is None or reference_stats is None:
        raise ConfigError(f"evaluating {name!r} images needs FID's Inception weights and the data's reference "
                          "statistics on this machine: pass --inception=weights.npz and --reference_stats=stats.npz "
                          "(nothing is downloaded).")
    from difflax.metrics.inception import inception_feature_fn, load_inception

    return {"feature_fn": inception_feature_fn(load_inception(inception)),
            "reference_stats": stats_lib.load_stats(reference_stats)}


def evaluate_run(workdir: str, step="latest", *, seeds=(0, 1, 2), num_samples: int = 1000, batch_size: int = 500,
                 solver=None, steps=None, grid=None, guidance_scale=None, inception=None,
                 reference_stats=None) -> dict:
    """Evaluate the run in ``workdir``; writes and returns the contents of ``workdir/eval.json``."""
    trainer, state = load_run(workdir, step)
    config = _with_sampler(trainer.config, solver, steps, grid, guidance_scale)
    for flag, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if value < 1:
            raise ConfigError(f"--{flag} = {value} is not allowed: it must be an integer >= 1.")
    protocol = _protocol(trainer, inception, reference_stats)
    cfg = config.sample
    conditional = config.model.get("class_conditional", False)
    result = evaluate(
        trainer.denoiser(state.ema_params, cfg.get("guidance_scale", 1.0)), trainer.process, trainer.example_shape,
        seeds=[int(s) for s in seeds], num_samples=num_samples, batch_size=min(batch_size, num_samples),
        solver=cfg.solver, steps=cfg.steps, grid=cfg.grid,
        num_classes=trainer.num_classes if conditional else None, **protocol,
    )
    report = {"workdir": os.path.abspath(workdir), "step": int(state.step), "data": config.data.name,
              "sampler": {"solver": cfg.solver, "steps": cfg.steps, "grid": cfg.grid,
                          "guidance_scale": cfg.get("guidance_scale", 1.0)},
              "seeds": result.seeds, "num_samples": num_samples, "metrics": result.metrics}
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report
