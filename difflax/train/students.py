"""What every distillation runner shares: the teacher as a :class:`Network`, the trained :class:`Student`,
the optimizer, data batches, teacher sample pairs, the extra scalar input and the flow read of a process.

The runners themselves are in :mod:`difflax.train.distill` (and :mod:`difflax.train.flow_maps`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax
from flax import traverse_util

from difflax import distill
from difflax.processes import Flow
from difflax.train.builders import init_params, make_apply, make_denoiser, make_features
from difflax.train.fit import fit
from difflax.train.optim import make_optimizer, skip_nonfinite, update_rule

__all__ = [
    "Network",
    "Student",
    "data_batches",
    "fit_student",
    "flow_of",
    "optimizer",
    "teacher_pairs",
    "with_scalar_input",
]


@dataclasses.dataclass(frozen=True)
class Network:
    """A network and what turns it into a denoiser: ``model.apply(params, x, noise_scale * c, y, w=...)``."""

    model: Any
    params: Any
    process: Any
    prediction: str
    example_shape: tuple
    noise_scale: float = 1.0

    @classmethod
    def from_trainer(cls, trainer, params) -> Network:
        return cls(
            trainer.model,
            params,
            trainer.process,
            trainer.config.model.prediction,
            tuple(trainer.example_shape),
            trainer.config.model.get("noise_scale", 1.0),
        )

    @property
    def num_classes(self) -> int | None:
        return getattr(self.model, "num_classes", None)

    def apply(self, params=None, y=None, w=None):
        """The raw network ``apply(x, c) -> F`` (labels ``y`` and guidance ``w`` closed over)."""
        params = self.params if params is None else params
        return make_apply(self.model, params, y, noise_scale=self.noise_scale, w=w)

    def denoiser(self, params=None, y=None, w=None, process=None):
        """``denoise(x_t, t)``; ``process`` reads an ``"edm"`` network on another process (same ODE)."""
        process = self.process if process is None else process
        if process is not self.process and self.prediction != "edm":
            raise ValueError(f"only an 'edm' network can be read on another process; this one is {self.prediction!r}.")
        params = self.params if params is None else params
        return make_denoiser(
            self.model,
            params,
            process,
            self.prediction,
            y,
            noise_scale=self.noise_scale,
            w=w,
            sigma_data=getattr(self.process, "sigma_data", None),
        )

    def features(self, params=None, y=None, w=None):
        """``features(x_t, t)``: the network's bottleneck features (:func:`make_features`) on its own process."""
        params = self.params if params is None else params
        return make_features(
            self.model,
            params,
            self.process,
            self.prediction,
            y,
            noise_scale=self.noise_scale,
            w=w,
            sigma_data=getattr(self.process, "sigma_data", None),
        )

    def batch_labels(self, batch):
        """The batch's labels if the network is class-conditional, else ``None``."""
        return None if self.num_classes is None else batch["y"]

    def labels(self, key, num):
        """Balanced random labels for a conditional network, else ``None``."""
        return None if self.num_classes is None else jax.random.randint(key, (num,), 0, self.num_classes)


@dataclasses.dataclass(frozen=True)
class Student:
    """A trained student and its sampler ``sample(params, key, x_T, y=None, steps=...) -> x``.

    ``x_T`` is a draw of the teacher's prior (``process.prior_sample``); ``steps`` is the
    number of network calls where the method allows a choice; ``seconds`` is the training time.
    """

    method: str
    params: Any
    sample: Callable
    seconds: float
    history: list


def _optim_config(learning_rate: float, steps: int, warmup: int, grad_clip: float) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            optimizer="adam",
            learning_rate=learning_rate,
            schedule="constant",
            warmup_steps=min(warmup, steps // 2),
            b1=0.9,
            b2=0.99,
            eps=1e-8,
            weight_decay=0.0,
            grad_clip=grad_clip,
            grad_accum=1,
            max_nonfinite=20,
        )
    )


def optimizer(learning_rate: float, steps: int, warmup: int = 100, grad_clip: float = 1.0, generator_every: int = 1):
    """Adam with warm-up, constant rate and clipping (the recipes' :func:`make_optimizer`).

    ``generator_every > 1`` is a two time-scale update (Heusel et al. 2017; DMD2, Yin et al. 2024b): the
    parameters under ``"gen"`` are updated only at steps ``generator_every - 1, 2 generator_every - 1, ...``
    (their own Adam state, warm-up and clipping), the others at every step.
    """
    if generator_every < 1:
        raise ValueError(f"generator_every must be >= 1; got {generator_every}.")
    if generator_every == 1:
        return make_optimizer(_optim_config(learning_rate, steps, warmup, grad_clip), steps)
    generator_steps = max(steps // generator_every, 1)
    gen = optax.transforms.conditionally_mask(
        update_rule(_optim_config(learning_rate, generator_steps, warmup, grad_clip), generator_steps),
        lambda n: n % generator_every == generator_every - 1,
    )
    rest = update_rule(_optim_config(learning_rate, steps, warmup, grad_clip), steps)

    def labels(params):
        return {name: "gen" if name == "gen" else "rest" for name in params}

    return skip_nonfinite(optax.multi_transform({"gen": gen, "rest": rest}, labels))


def fit_student(loss_fn, params, batches, steps: int, learning_rate: float, key, desc: str, **kwargs):
    """:func:`difflax.train.fit.fit` as every runner calls it: :func:`optimizer` at ``learning_rate``, a log
    record every tenth of the run; ``kwargs`` (e.g. ``ema``) go to ``fit``."""
    return fit(
        loss_fn, params, optimizer(learning_rate, steps), batches, steps,
        key=key, log_every=max(steps // 10, 1), desc=desc, **kwargs,
    )  # fmt: skip


def data_batches(data, batch_size, seed, extra=None):
    """``batches(step)``: the data's batch ``step`` of ``batch_size`` (seeded), with the entries of ``extra`` added."""

    def batches(step):
        batch = dict(data.batch(seed, step, batch_size))
        batch.update(extra or {})
        return batch

    return batches


def teacher_pairs(teacher: Network, key, num: int, solver: str = "heun", steps: int = 18) -> dict:
    """``num`` (noise, sample) pairs of the teacher's sampler from its prior, with balanced random labels
    ``"y"`` for a conditional teacher (:func:`difflax.distill.teacher_trajectories`)."""
    k_noise, k_label = jax.random.split(key)
    x_T = teacher.process.prior_sample(k_noise, (num, *teacher.example_shape))
    y = teacher.labels(k_label, num)
    pairs = jax.jit(
        lambda x, yy: distill.teacher_trajectories(
            teacher.denoiser(teacher.params, yy), teacher.process, x, steps=steps, solver=solver
        )
    )(x_T, y)
    return pairs if y is None else {**pairs, "y": y}


def with_scalar_input(teacher: Network, key) -> tuple[Network, Any]:
    """The teacher's architecture with the extra scalar input ``w`` (``guidance_embedding=True``) and its
    parameters: the teacher's, plus a fresh ``w`` embedding whose last layer is zero, so that the student
    starts as the teacher for every ``w``. ``w`` is the guidance strength of guidance distillation, the
    interval ``t - r`` of MeanFlow and the step size ``d`` of shortcut models."""
    model = teacher.model.clone(guidance_embedding=True)
    fresh = traverse_util.flatten_dict(init_params(model, key, teacher.example_shape, teacher.num_classes is not None))
    fresh.update(traverse_util.flatten_dict(teacher.params))
    return dataclasses.replace(teacher, model=model), traverse_util.unflatten_dict(fresh)


def flow_of(process) -> Flow:
    """The rectified-flow process spanning the same noise levels ``s = sigma / alpha`` as ``process``.

    ``Flow`` has ``s = t / (1 - t)``, so ``t = s / (1 + s)``; ending below ``t = 1`` keeps
    ``alpha > 0``, which an EDM-preconditioned network read on the flow needs. A ``Flow``
    is returned as is.
    """
    if isinstance(process, Flow):
        return process
    levels = [float(process.sigma(t) / process.alpha(t)) for t in (process.t_min, process.t_max)]
    return Flow(t_min=levels[0] / (1.0 + levels[0]), t_max=levels[1] / (1.0 + levels[1]))
