"""Training few-step students from a trained teacher network: one runner per distillation method.

Each runner takes a :class:`~difflax.train.students.Network` (a trained Flax model with what makes it a denoiser),
trains a student with :func:`difflax.train.fit.fit` on a loss of :mod:`difflax.distill`,
and returns a :class:`~difflax.train.students.Student`: its parameters, its sampler and the training history.
Students start from the teacher's weights, as in every paper implemented here. (Adv-KD,
whose student is a network of its own, is trained by :mod:`difflax.train.advkd`.)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

import difflax
from difflax import distill
from difflax.train.fit import fit
from difflax.train.flow_maps import meanflow, scm, shortcut
from difflax.train.matching import dmd, dmd2
from difflax.train.students import (
    Network,
    Student,
    data_batches,
    fit_student,
    flow_of,
    optimizer,
    teacher_pairs,
    with_scalar_input,
)

# The shared pieces (difflax.train.students), the flow-map runners (difflax.train.flow_maps) and the
# distribution-matching runners (difflax.train.matching) are exported here too, so that every runner is
# ``difflax.train.distill.<method>``.
__all__ = [
    "Network",
    "Student",
    "consistency",
    "dmd",
    "dmd2",
    "flow_of",
    "guidance",
    "guided_network",
    "meanflow",
    "optimizer",
    "progressive",
    "reflow",
    "scm",
    "shortcut",
    "teacher_pairs",
    "with_scalar_input",
]


# ------------------------------------------------------------------ progressive distillation
def progressive(
    teacher: Network,
    data,
    key,
    *,
    start_steps: int = 32,
    end_steps: int = 4,
    steps_per_round: int = 500,
    batch_size: int = 64,
    learning_rate: float = 2e-4,
    grid: str = "karras",
    weighting="truncated_snr",
    w_range: tuple[float, float] | None = None,
    seed: int = 0,
) -> Student:
    """Progressive distillation (Salimans & Ho 2022) from ``start_steps`` DDIM steps down to ``end_steps``.

    Each round halves the steps: the student (initialized from the current teacher) learns
    :func:`difflax.distill.progressive_loss` on the teacher's grid, then becomes the teacher.

    ``w_range``: stage two of guidance distillation (Meng et al. 2023): the teacher is a guidance-distilled
    student (:func:`guided_network` of :func:`guidance`'s result), every example draws its guidance strength
    ``w`` uniformly from ``w_range`` and teacher and student both see it; the sampler takes ``w``.
    """
    if w_range is not None and not getattr(teacher.model, "guidance_embedding", False):
        raise ValueError("w_range needs a w-conditioned teacher: the guidance-distilled student (guided_network).")
    if start_steps % end_steps or (start_steps // end_steps) & (start_steps // end_steps - 1):
        raise ValueError(f"start_steps / end_steps must be a power of 2; got {start_steps} / {end_steps}.")
    process = teacher.process
    ts = difflax.make_grid(grid, process, start_steps)
    params, history, start = teacher.params, [], time.perf_counter()
    rnd = 0
    while ts.shape[0] - 1 > end_steps:
        teacher_ts = ts

        def loss_fn(p, batch, k, state, teacher_ts=teacher_ts):
            y = teacher.batch_labels(batch)
            w = None
            if w_range is not None:
                k_w, k = jax.random.split(k)
                w = jax.random.uniform(k_w, batch["x"].shape[:1], minval=w_range[0], maxval=w_range[1])
            student, tch = teacher.denoiser(p, y, w), teacher.denoiser(batch["teacher"], y, w)
            loss = distill.progressive_loss(student, tch, process, batch["x"], k, teacher_ts, weighting=weighting)
            return jnp.mean(loss), {}

        batches = data_batches(data, batch_size, seed + rnd, {"teacher": params})
        state, hist = fit(
            loss_fn,
            params,
            optimizer(learning_rate, steps_per_round),
            batches,
            steps_per_round,
            key=jax.random.fold_in(key, rnd),
            log_every=max(steps_per_round // 5, 1),
            desc=f"progressive {ts.shape[0] - 1}->{(ts.shape[0] - 1) // 2}",
        )
        params = state.params
        ts = distill.student_grid(teacher_ts)
        history += [{**h, "round": rnd} for h in hist]
        rnd += 1
    final_ts = ts

    def sample(p, k, x_T, y=None, steps=end_steps, w=None):
        if steps != end_steps:
            raise ValueError(f"this student was distilled for {end_steps} steps; got steps={steps}.")
        if (w is None) != (w_range is None):
            raise ValueError("pass w exactly when the student was distilled with a w_range (guidance, stage two).")
        w = None if w is None else jnp.full((x_T.shape[0],), w, jnp.float32)
        return difflax.sample(
            teacher.denoiser(p, y, w), process, x_T, solver="ddim", grid=final_ts, steps=end_steps, final_zero=True
        )[0]

    return Student("progressive", params, sample, time.perf_counter() - start, history)


# ------------------------------------------------------------------ consistency distillation / training
def consistency(
    teacher: Network,
    data,
    key,
    *,
    distill_from_teacher: bool = True,
    steps: int = 1000,
    num_levels: int = 18,
    curriculum: str | None = None,
    batch_size: int = 64,
    learning_rate: float = 2e-4,
    target_ema: float = 0.95,
    distance: str = "pseudo_huber",
    weighting: str = "uniform",
    noise: str = "uniform",
    method: str = "heun",
    mid_level: float = 0.821,
    ect_stages: int = 8,
    seed: int = 0,
    init_params_from=None,
) -> Student:
    """Consistency distillation (``distill_from_teacher=True``) or training (Song et al. 2023; 2024).

    ``curriculum``: ``None`` (fixed ``num_levels``), ``"ct"`` (Song et al. 2023, with the
    adaptive target EMA) or ``"ict"`` (Song & Dhariwal 2024: the doubling schedule, no EMA
    target) or ``"ect"`` (easy consistency tuning, Geng et al. 2024: :func:`difflax.distill.ect_loss` with
    the stage ``floor(ect_stages k / K)``, no EMA target; ``num_levels``, ``weighting`` and ``noise`` do not
    apply). ``target_ema`` is the target decay ``mu`` for a fixed ``num_levels`` (0: no EMA,
    the target is the stop-gradient of the student, as in improved CT). Returns a student
    whose ``sample(params, key, x_T, y, steps)`` is multistep consistency sampling with
    ``steps`` 1 or 2 (the second at noise level ``mid_level``, Song et al. 2023).
    """
    process = teacher.process
    if curriculum == "ct":
        max_levels = 151

        def levels_at(step):
            return distill.ct_curriculum(step, steps)

        def ema(step):
            return distill.ct_target_decay(levels_at(step))
    elif curriculum == "ict":
        max_levels = 1281

        def levels_at(step):
            return distill.ict_curriculum(step, steps)

        ema = 0.0
    elif curriculum == "ect":
        ema = 0.0
    elif curriculum is None:
        max_levels = num_levels

        def levels_at(step):
            return num_levels

        ema = target_ema
    else:
        raise ValueError(f"curriculum must be None, 'ct', 'ict' or 'ect'; got {curriculum!r}.")

    def f(p, y):
        return distill.consistency_function(teacher.apply(p, y), process)

    def loss_fn(p, batch, k, state):
        y = teacher.batch_labels(batch)
        tch = teacher.denoiser(batch["teacher"], y) if distill_from_teacher else None
        if curriculum == "ect":
            stage = state.step * ect_stages // steps
            student = f(p, y)
            loss = distill.ect_loss(
                student,
                student,
                process,
                batch["x"],
                k,
                stage=stage,
                teacher=tch,
                method=method,
                distance_kind=distance,
            )
            return jnp.mean(loss), {"stage": stage}
        loss = distill.consistency_loss(
            f(p, y),
            f(state.ema_params, y),
            process,
            batch["x"],
            k,
            num_levels=levels_at(state.step),
            max_levels=max_levels,
            teacher=tch,
            method=method,
            distance_kind=distance,
            weighting=weighting,
            noise=noise,
        )
        return jnp.mean(loss), {}

    start = time.perf_counter()
    params = teacher.params if init_params_from is None else init_params_from
    batches = data_batches(data, batch_size, seed, {"teacher": teacher.params} if distill_from_teacher else None)
    state, history = fit_student(loss_fn, params, batches, steps, learning_rate, key, "consistency", ema=ema)
    t_mid = process.t_from_log_snr(-2.0 * jnp.log(jnp.asarray(mid_level, jnp.float32)))

    def sample(p, k, x_T, y=None, steps=1):
        ts = jnp.stack([jnp.asarray(process.t_max, jnp.float32), t_mid])[:steps]
        return distill.consistency_sample(f(p, y), process, x_T, k, ts)[0]

    name = "ect" if curriculum == "ect" else "cd" if distill_from_teacher else "ct"
    return Student(name, state.params, sample, time.perf_counter() - start, history)


# ------------------------------------------------------------------ reflow
def reflow(
    teacher: Network,
    key,
    *,
    num_pairs: int = 4096,
    pair_solver: str = "heun",
    pair_steps: int = 18,
    steps: int = 1000,
    batch_size: int = 64,
    learning_rate: float = 2e-4,
    pairs_path: str | None = None,
    seed: int = 0,
) -> tuple[Student, dict]:
    """Reflow (Liu et al. 2023): a flow trained on the teacher's (noise, sample) couplings.

    The student is the teacher's network read on the :class:`~difflax.processes.Flow` of
    :func:`flow_of` (an ``"edm"`` network, or a flow teacher), so it starts with the
    teacher's ODE. Pairs are
    written with :func:`difflax.distill.save_trajectories` to ``pairs_path`` when given.
    Returns the student (``sample(params, key, x_T, y, steps)``: Euler on the flow from
    ``z = x_T / sigma(t_max)``) and the pairs.
    """
    process = teacher.process
    flow = flow_of(process)
    k_pairs, k_fit = jax.random.split(key)
    pairs = teacher_pairs(teacher, k_pairs, num_pairs, pair_solver, pair_steps)
    pairs = {**pairs, "z": pairs["noise"] / process.sigma(jnp.asarray(process.t_max, jnp.float32))}
    if pairs_path is not None:
        distill.save_trajectories(pairs_path, pairs)

    def batches(step):
        idx = jax.random.randint(jax.random.fold_in(jax.random.key(seed), step), (batch_size,), 0, num_pairs)
        return {k: pairs[k][idx] for k in ("x0", "z", "y") if k in pairs}

    def loss_fn(p, batch, k, state):
        student = teacher.denoiser(p, teacher.batch_labels(batch), process=flow)
        return jnp.mean(distill.reflow_loss(student, batch["x0"], batch["z"], k, process=flow)), {}

    start = time.perf_counter()
    state, history = fit_student(loss_fn, teacher.params, batches, steps, learning_rate, k_fit, "reflow")

    scale = flow.sigma(jnp.asarray(flow.t_max, jnp.float32)) / process.sigma(jnp.asarray(process.t_max, jnp.float32))

    def sample(p, k, x_T, y=None, steps=1):
        return difflax.sample(
            teacher.denoiser(p, y, process=flow), flow, scale * x_T, solver="euler", steps=steps, grid="uniform"
        )[0]

    return Student("reflow", state.params, sample, time.perf_counter() - start, history), pairs


# ------------------------------------------------------------------ guidance distillation
def guidance(
    teacher: Network,
    data,
    key,
    *,
    sample_t: Callable,
    steps: int = 1000,
    w_range=(0.0, 4.0),
    batch_size: int = 64,
    learning_rate: float = 2e-4,
    weighting: str = "snr+1",
    seed: int = 0,
) -> Student:
    """Guidance distillation (Meng et al. 2023, stage one) of a class-conditional teacher.

    The student is the teacher's architecture with ``guidance_embedding=True``, initialized
    from the teacher (the new ``w`` embedding starts at zero, so the student starts as the
    conditional teacher). ``sample_t(key, shape)`` draws training noise levels. The student's
    sampler takes ``w`` and any solver of :func:`difflax.sample`, with one network call per
    denoiser evaluation (classifier-free guidance of the teacher makes two).
    """
    if teacher.num_classes is None:
        raise ValueError("guidance distillation needs a class-conditional teacher (model.num_classes set).")
    process = teacher.process
    k_init, k_fit = jax.random.split(key)
    student_net, params = with_scalar_input(teacher, k_init)
    null = teacher.num_classes

    def loss_fn(p, batch, k, state):
        k_t, k_loss = jax.random.split(k)
        x0, y = batch["x"], batch["y"]
        t = sample_t(k_t, (x0.shape[0],))

        def student(z, tt, w):
            return student_net.denoiser(p, y, w)(z, tt)

        def tch(z, tt, yy):
            return teacher.denoiser(batch["teacher"], yy)(z, tt)

        loss = distill.guidance_distillation_loss(
            student, tch, y, process, x0, t, k_loss, null=null, w_range=w_range, weighting=weighting
        )
        return jnp.mean(loss), {}

    start = time.perf_counter()
    batches = data_batches(data, batch_size, seed, {"teacher": teacher.params})
    state, history = fit_student(loss_fn, params, batches, steps, learning_rate, k_fit, "guidance")

    def sample(p, k, x_T, y=None, steps=18, w=1.0, solver="heun", grid="karras"):
        w = jnp.full((x_T.shape[0],), w, jnp.float32)
        return difflax.sample(student_net.denoiser(p, y, w), process, x_T, solver=solver, steps=steps, grid=grid)[0]

    return Student("guidance", state.params, sample, time.perf_counter() - start, history)


def guided_network(teacher: Network, student: Student) -> Network:
    """The guidance-distilled ``student`` of ``teacher`` (:func:`guidance`) as a :class:`Network` whose
    denoiser takes ``w``: the teacher of stage two, :func:`progressive` with ``w_range``."""
    if student.method != "guidance":
        raise ValueError(f"guided_network takes the student of guidance(); got one of {student.method!r}.")
    model = teacher.model.clone(guidance_embedding=True)
    return dataclasses.replace(teacher, model=model, params=student.params)
