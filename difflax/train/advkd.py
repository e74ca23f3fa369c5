"""Adversarial knowledge distillation end to end: teacher trajectories, the stage student and its critics.

Adv-KD (Mekonnen, Dall'Asen & Rota 2023) trains a one-pass student of submodules at growing
resolution, each matched to the teacher's state at one time step by a per-stage WGAN-GP
critic (and optionally by regression). :func:`train_advkd` takes a frozen teacher denoiser
and its process, builds the student of :mod:`difflax.models.advkd`, trains it with
:func:`difflax.train.fit.fit` on the losses of :mod:`difflax.distill.advkd`, and returns
something that samples in one pass. (The other methods' runners are in
:mod:`difflax.train.distill`.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax

from difflax.distill.advkd import advkd_loss, advkd_timesteps, downsample_targets, stage_times
from difflax.distill.trajectories import teacher_trajectories
from difflax.models.advkd import AdvKDCritics, AdvKDStudent, advkd_networks
from difflax.solvers import resolve_grid, resolve_solver
from difflax.train.fit import fit

__all__ = ["AdvKDResult", "advkd_teacher_grid", "train_advkd"]


@dataclass(frozen=True)
class AdvKDResult:
    """A trained Adv-KD student.

    Attributes:
      student, critics: the networks (:class:`~difflax.models.advkd.AdvKDStudent`, ``AdvKDCritics``).
      params, ema_params: ``{"student": ..., "critic": ...}`` after training, and their EMA.
      timesteps: DDPM step indices of the internal stages (noisiest first).
      times: process times targeted by every output (the last is 0: the sample).
      scales: each output's normalization ``sqrt(alpha(t)^2 + sigma(t)^2)``; the student
        predicts ``x_t / scale`` (1 for variance-preserving processes and for the sample).
      factors: each output's downsampling factor.
      noise_std: standard deviation of the teacher's ``x_T`` (the student sees ``x_T / noise_std``).
      history: the metrics logged by :func:`~difflax.train.fit.fit`.
      teacher_grid: the teacher's time grid (its steps with the stage times inserted).
      trajectories: the teacher data trained on, ``{"noise": x_T, "intermediates": states}``
        (``states`` of shape ``(outputs, N, ...)`` in process units, full resolution); pass it
        back as ``train_advkd(..., trajectories=...)`` to train again on it.
      seconds: wall time of :func:`train_advkd` (teacher trajectories and training).
    """

    student: AdvKDStudent
    critics: AdvKDCritics
    params: dict
    ema_params: dict
    timesteps: np.ndarray
    times: np.ndarray
    scales: np.ndarray
    factors: tuple
    noise_std: float
    history: list = field(default_factory=list)
    teacher_grid: np.ndarray | None = None
    trajectories: dict | None = None
    seconds: float = 0.0

    def stage_outputs(self, z: jax.Array, *, ema: bool = True) -> tuple[jax.Array, ...]:
        """Every stage's output for unit Gaussian noise ``z``, in process units (``x_{t_n}`` downsampled)."""
        params = (self.ema_params if ema else self.params)["student"]
        outputs = self.student.apply({"params": params}, z)
        return tuple(y * s for y, s in zip(outputs, self.scales, strict=True))

    def sample(self, key: jax.Array, num: int, *, ema: bool = True) -> jax.Array:
        """``num`` samples in one pass of the student."""
        z = jax.random.normal(key, (num, *self.student.data_shape))
        return _final_output(
            self.student, (self.ema_params if ema else self.params)["student"], z, float(self.scales[-1])
        )

    def from_noise(self, x_T: jax.Array, *, ema: bool = True) -> jax.Array:
        """The student's sample for the teacher's own starting noise ``x_T`` (what it was paired with)."""
        params = (self.ema_params if ema else self.params)["student"]
        return _final_output(self.student, params, x_T / self.noise_std, float(self.scales[-1]))


def _final_output(student, params, z, scale):
    return student.apply({"params": params}, z)[-1] * scale


def advkd_teacher_grid(process, times, *, steps: int, solver: str = "ddim", grid=None, **solver_args):
    """The teacher's time grid with the stage times inserted, and the grid index of each stage.

    The named (or given) grid of ``steps`` steps gets every time of ``times`` that it does not
    already hold within ``1e-6`` (a gap float32 still resolves), so the teacher's intermediates
    sit at the stage times. Returns ``(ts, indices)``: ``ts`` the merged decreasing grid (ending
    in 0 when the original does), ``indices[k]`` the position of ``times[k]`` in it.
    """
    ts, final_zero = resolve_grid(grid, resolve_solver(solver, solver_args), process, steps, None)
    ts = np.asarray(ts, dtype=np.float64)
    times = np.asarray(times, dtype=np.float64)
    positive = ts[:-1] if final_zero else ts
    extra = [t for t in np.unique(times) if np.min(np.abs(positive - t)) > 1e-6]
    merged = np.sort(np.concatenate([positive, np.asarray(extra, np.float64)]))[::-1]
    if final_zero:
        merged = np.concatenate([merged, [0.0]])
    indices = np.asarray([int(np.argmin(np.abs(merged - t))) for t in times], dtype=np.int32)
    return merged, indices


def train_advkd(
    teacher: Callable,
    process,
    data_shape: Sequence[int],
    key: jax.Array,
    *,
    steps: int,
    num_stages: int = 3,
    timesteps: Sequence[int] | None = None,
    num_timesteps: int = 1000,
    num_trajectories: int = 2048,
    teacher_steps: int = 50,
    solver: str = "ddim",
    grid=None,
    solver_args: dict | None = None,
    chunk: int = 512,
    batch_size: int = 128,
    adversarial_weight: float = 1.0,
    regression_weight: float = 0.0,
    gp_weight: float = 10.0,
    stage_weights: Sequence[float] | None = None,
    learning_rate: float = 2e-4,
    critic_learning_rate: float | None = None,
    critic_steps: int = 1,
    betas: tuple[float, float] = (0.5, 0.9),
    ema: float = 0.999,
    features: int | None = None,
    depth: int = 1,
    critic_features: int | None = None,
    critic_depth: int = 2,
    min_size: int = 2,
    trajectories: dict | None = None,
    log_every: int = 100,
    progress: bool = False,
) -> AdvKDResult:
    """Adv-KD end to end: teacher trajectories, student and critics, training.

    1. Stage time steps: ``timesteps`` (DDPM step indices, noisiest first) or the paper's
       :func:`~difflax.distill.advkd.advkd_timesteps` ``(num_stages)``, turned into process
       times by :func:`~difflax.distill.advkd.stage_times`; the student has
       ``len(timesteps) + 1`` outputs, the last the sample.
    2. The teacher samples ``num_trajectories`` trajectories from ``x_T`` with ``solver`` on
       its ``teacher_steps``-step grid with the stage times inserted
       (:func:`advkd_teacher_grid`), keeping the states at those times and the final sample
       (:func:`~difflax.distill.trajectories.teacher_trajectories`); each is divided by
       ``sqrt(alpha(t)^2 + sigma(t)^2)`` (1 for VP processes) and average-pooled to its
       stage's resolution. ``trajectories`` (``result.trajectories`` of an earlier run with
       the same time steps and grid) skips this step.
    3. :func:`~difflax.train.fit.fit` minimizes :func:`~difflax.distill.advkd.advkd_loss`
       over ``{"student", "critic"}`` with Adam (``betas``; the critics at
       ``critic_learning_rate``, default ``learning_rate``), minibatches of ``batch_size``
       drawn from the trajectories, and an EMA ``ema`` of the parameters. The critics step
       every iteration; with ``critic_steps = k > 1`` the student steps every ``k``-th, with
       the mean of its last ``k`` gradients (``optax.MultiSteps``), the ``n_critic`` of WGAN-GP.

    Args:
      teacher: the frozen teacher denoiser ``denoise(x_t, t) -> x0_hat``.
      process: its forward process.
      data_shape: one example's shape, ``(H, W, C)`` images or ``(D,)`` flat data.
      key: PRNG key (noise, parameters, minibatches, penalty interpolates).
      steps: training steps.
      adversarial_weight, regression_weight, gp_weight, stage_weights: as for ``advkd_loss``.
      features, depth, critic_features, critic_depth, min_size: network sizes
        (:func:`~difflax.models.advkd.advkd_networks`).

    Returns:
      an :class:`AdvKDResult`; ``result.sample(key, n)`` draws in one student pass.
    """
    start = time.perf_counter()
    data_shape = tuple(int(d) for d in data_shape)
    solver_args = dict(solver_args or {})
    for name, value, low in (("steps", steps, 0), ("critic_steps", critic_steps, 1), ("batch_size", batch_size, 1)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an int >= {low}; got {value!r}.")
    if timesteps is None:
        timesteps = advkd_timesteps(num_stages, num_timesteps)
    timesteps = np.asarray(timesteps, dtype=np.int32).reshape(-1)
    if timesteps.size == 0 or np.any(np.diff(timesteps) > 0):
        raise ValueError(f"timesteps must be non-empty and non-increasing (noisiest first); got {timesteps.tolist()}.")
    times = np.concatenate([stage_times(process, timesteps, num_timesteps), [0.0]])
    ts, indices = advkd_teacher_grid(process, times[:-1], steps=teacher_steps, solver=solver, grid=grid, **solver_args)
    if ts[-1] != 0.0:
        raise ValueError("Adv-KD's last stage is the teacher's sample: use a grid that ends in 0 (final_zero).")
    save_steps = np.concatenate([indices, [len(ts) - 1]]).astype(np.int32)
    k_noise, k_solver, k_init, k_fit = jax.random.split(key, 4)

    if trajectories is None:
        trajectories = _teacher_data(
            teacher,
            process,
            data_shape,
            k_noise,
            k_solver,
            ts,
            save_steps,
            num_trajectories,
            chunk,
            solver,
            solver_args,
        )
    noise_std = float(process.prior_std())
    noise = jnp.asarray(trajectories["noise"]) / noise_std
    alpha, sigma = process.alpha_sigma(jnp.asarray(times[:-1], jnp.float32))
    scales = np.concatenate([np.sqrt(np.asarray(alpha) ** 2 + np.asarray(sigma) ** 2), [1.0]]).astype(np.float32)
    states = jnp.asarray(trajectories["intermediates"])
    if states.shape[0] != len(times) or states.shape[2:] != data_shape or noise.shape[1:] != data_shape:
        raise ValueError(
            f"trajectories hold states of shape {states.shape} and noise of shape {noise.shape}; this run needs "
            f"({len(times)}, N, {', '.join(map(str, data_shape))}) and (N, {', '.join(map(str, data_shape))})."
        )
    student, critics = advkd_networks(
        data_shape,
        len(times),
        features=features,
        depth=depth,
        critic_features=critic_features,
        critic_depth=critic_depth,
        min_size=min_size,
    )
    targets = downsample_targets([states[i] / scales[i] for i in range(len(times))], student.factors)

    k_s, k_c = jax.random.split(k_init)
    student_params = student.init(k_s, noise[:1])["params"]
    examples = student.apply({"params": student_params}, noise[:1])
    critic_params = critics.init(k_c, examples, method=AdvKDCritics.init_all)["params"]
    params = {"student": student_params, "critic": critic_params}

    def student_fn(p, z):
        return student.apply({"params": p}, z)

    def critic_fn(p, n, x):
        return critics.apply({"params": p}, x, n)

    def loss_fn(p, batch, k, state):
        return advkd_loss(
            student_fn,
            critic_fn,
            p,
            batch["noise"],
            batch["targets"],
            k,
            adversarial_weight=adversarial_weight,
            regression_weight=regression_weight,
            gp_weight=gp_weight,
            stage_weights=stage_weights,
        )

    num = noise.shape[0]
    k_data = jax.random.fold_in(k_fit, 1)

    @jax.jit
    def take(step):
        idx = jax.random.randint(jax.random.fold_in(k_data, step), (batch_size,), 0, num)
        return {"noise": noise[idx], "targets": tuple(t[idx] for t in targets)}

    b1, b2 = betas
    student_tx = optax.adam(learning_rate, b1=b1, b2=b2)
    if critic_steps > 1:
        student_tx = optax.MultiSteps(student_tx, every_k_schedule=critic_steps)
    tx = optax.multi_transform(
        {"student": student_tx, "critic": optax.adam(critic_learning_rate or learning_rate, b1=b1, b2=b2)},
        {name: jax.tree.map(lambda _, name=name: name, sub) for name, sub in params.items()},
    )
    state, history = fit(
        loss_fn, params, tx, take, steps, key=k_fit, ema=ema, log_every=log_every, progress=progress, desc="advkd"
    )
    return AdvKDResult(
        student=student,
        critics=critics,
        params=state.params,
        ema_params=state.ema_params,
        timesteps=timesteps,
        times=times,
        scales=scales,
        factors=tuple(student.factors),
        noise_std=noise_std,
        history=history,
        teacher_grid=ts,
        trajectories=trajectories,
        seconds=time.perf_counter() - start,
    )


def _teacher_data(teacher, process, data_shape, k_noise, k_solver, ts, save_steps, num, chunk, solver, solver_args):
    """Teacher trajectories for ``num`` noises, in jitted chunks of ``chunk``."""
    x_T = process.prior_sample(k_noise, (num, *data_shape))
    ts = jnp.asarray(ts, jnp.float32)

    @jax.jit
    def run(x, k):
        out = teacher_trajectories(
            teacher,
            process,
            x,
            steps=ts.shape[0] - 1,
            save_steps=save_steps,
            solver=solver,
            grid=ts,
            key=k,
            **solver_args,
        )
        return out["intermediates"]

    parts = []
    for i, start in enumerate(range(0, num, chunk)):
        x = x_T[start : start + chunk]
        pad = chunk - x.shape[0]
        x = jnp.concatenate([x, jnp.zeros((pad, *data_shape), x.dtype)]) if pad else x
        parts.append(run(x, jax.random.fold_in(k_solver, i))[:, : chunk - pad])
    return {"noise": x_T, "intermediates": jnp.concatenate(parts, axis=1)}
