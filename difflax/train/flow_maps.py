"""Runners for students that learn a flow map of the teacher's ODE, or its average velocity, directly:
MeanFlow (Geng et al. 2025), shortcut models (Frans et al. 2024) and continuous-time consistency, sCM
(Lu & Song 2024). The losses are in :mod:`difflax.distill`; every runner returns a
:class:`~difflax.train.students.Student` like those of :mod:`difflax.train.distill`.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from difflax import distill
from difflax.models.embeddings import fourier_features
from difflax.parametrization import denoiser_to
from difflax.train.students import Network, Student, data_batches, fit_student, flow_of, with_scalar_input

__all__ = ["meanflow", "scm", "shortcut"]


# ------------------------------------------------------------------ average-velocity students: MeanFlow, shortcut
def _flow_velocity(net: Network, params, y, flow, w=None):
    """``v(x, t)`` of ``net`` read on ``flow`` (:func:`flow_of`)."""
    return denoiser_to(net.denoiser(params, y, w, process=flow), flow, "velocity")


def _average_velocity_student(
    method: str,
    teacher: Network,
    data,
    key,
    loss,
    *,
    distill_from_teacher: bool,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
) -> Student:
    """Train ``u(x, r, t)``, the velocity of the teacher's network read on :func:`flow_of` with ``w = t - r``
    (:func:`with_scalar_input`), on ``loss(u, x0, key, teacher_velocity, flow)``; sample with
    :func:`difflax.distill.average_velocity_sample` on ``steps`` uniform intervals from ``t_max`` to 0."""
    process = teacher.process
    flow = flow_of(process)
    k_init, k_fit = jax.random.split(key)
    student_net, params = with_scalar_input(teacher, k_init)

    def u_of(p, y):
        return lambda x, r, t: _flow_velocity(student_net, p, y, flow, t - r)(x, t)

    def loss_fn(p, batch, k, state):
        y = teacher.batch_labels(batch)
        v = _flow_velocity(teacher, batch["teacher"], y, flow) if distill_from_teacher else None
        return jnp.mean(loss(u_of(p, y), batch["x"], k, v, flow)), {}

    start = time.perf_counter()
    batches = data_batches(data, batch_size, seed, {"teacher": teacher.params} if distill_from_teacher else None)
    state, history = fit_student(loss_fn, params, batches, steps, learning_rate, k_fit, method)
    scale = flow.sigma(jnp.asarray(flow.t_max, jnp.float32)) / process.sigma(jnp.asarray(process.t_max, jnp.float32))

    def sample(p, k, x_T, y=None, steps=1):
        ts = jnp.linspace(flow.t_max, 0.0, steps + 1)
        return distill.average_velocity_sample(u_of(p, y), scale * x_T, ts)[0]

    return Student(method, state.params, sample, time.perf_counter() - start, history)


def meanflow(
    teacher: Network,
    data,
    key,
    *,
    distill_from_teacher: bool = True,
    steps: int = 1000,
    batch_size: int = 64,
    learning_rate: float = 2e-4,
    ratio: float = 0.75,
    p_mean: float = -0.4,
    p_std: float = 1.0,
    power: float = 0.0,
    seed: int = 0,
) -> Student:
    """MeanFlow (Geng et al. 2025): the average velocity ``u(x, r, t)`` on the teacher's flow reading
    (:func:`flow_of`), trained with :func:`difflax.distill.meanflow_loss` from the teacher's velocity
    (``distill_from_teacher=True``) or from scratch on the data (the conditional velocity), starting from the
    teacher's weights. ``ratio`` (the share of ``r != t``) and ``power`` (the adaptive weighting) default to
    values for a student that starts as the teacher (exact at ``r = t``); the paper's from-scratch values are
    0.25 and 1. ``sample(params, key, x_T, y, steps)`` takes ``steps`` (1, 2, 4, ...) network calls."""

    def loss(u, x0, k, v, flow):
        return distill.meanflow_loss(
            u,
            x0,
            k,
            teacher_velocity=v,
            ratio=ratio,
            p_mean=p_mean,
            p_std=p_std,
            power=power,
            t_min=flow.t_min,
            t_max=flow.t_max,
        )

    return _average_velocity_student(
        "meanflow",
        teacher,
        data,
        key,
        loss,
        distill_from_teacher=distill_from_teacher,
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
    )


def shortcut(
    teacher: Network,
    data,
    key,
    *,
    distill_from_teacher: bool = True,
    steps: int = 1000,
    batch_size: int = 64,
    learning_rate: float = 2e-4,
    consistency_fraction: float = 0.25,
    num_levels: int = 7,
    seed: int = 0,
) -> Student:
    """Shortcut model (Frans et al. 2024) on the teacher's flow reading, conditioned on the step size
    ``d = t - r``: :func:`difflax.distill.shortcut_loss` with the teacher's velocity (or the conditional one from
    scratch) for flow matching. ``sample(params, key, x_T, y, steps)`` with ``steps`` a power of 2 up to
    ``2^(num_levels - 1)``."""

    def loss(u, x0, k, v, flow):
        return distill.shortcut_loss(
            u,
            x0,
            k,
            teacher_velocity=v,
            consistency_fraction=consistency_fraction,
            num_levels=num_levels,
            t_min=flow.t_min,
            t_max=flow.t_max,
        )

    return _average_velocity_student(
        "shortcut",
        teacher,
        data,
        key,
        loss,
        distill_from_teacher=distill_from_teacher,
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
    )


# ------------------------------------------------------------------ continuous-time consistency (sCM)
def scm(
    teacher: Network,
    data,
    key,
    *,
    distill_from_teacher: bool = True,
    steps: int = 1000,
    batch_size: int = 64,
    learning_rate: float = 1e-4,
    warmup_steps: int | None = None,
    tangent_c: float = 0.1,
    p_mean: float = -1.0,
    p_std: float = 1.4,
    mid_time: float = 1.1,
    seed: int = 0,
) -> Student:
    """sCM (Lu & Song 2024) of an EDM-preconditioned teacher, read as a TrigFlow network
    (:func:`difflax.distill.edm_as_trigflow`): consistency distillation (sCD) from the teacher's ODE, or
    training (sCT) from the data, with tangent normalization ``tangent_c``, the tangent warm-up over
    ``warmup_steps`` (default a tenth of ``steps``) and a learned adaptive weight ``w(t)`` (linear in Fourier
    features of ``ln(sigma) / 4``). The student starts from the teacher; its consistency function is its EDM
    denoiser. ``sample(params, key, x_T, y, steps)``: multistep consistency sampling with ``steps`` 1 or 2 (the
    second at TrigFlow time ``mid_time``, 1.1 in the paper).
    """
    if teacher.prediction != "edm":
        raise ValueError(f"sCM reads an 'edm' teacher network as TrigFlow; this one is {teacher.prediction!r}.")
    process = teacher.process
    sd = getattr(process, "sigma_data", 0.5)
    levels = [process.sigma(t) / process.alpha(t) for t in (process.t_min, process.t_max)]
    t_min, t_max = (float(distill.trigflow_time(s, sd)) for s in levels)
    warmup_steps = max(steps // 10, 1) if warmup_steps is None else warmup_steps
    num_features = 64

    def log_weight(p):
        return lambda t: fourier_features(0.25 * jnp.log(sd * jnp.tan(t)), num_features, scale=1.0) @ p["w"] + p["b"]

    def loss_fn(p, batch, k, state):
        y = teacher.batch_labels(batch)
        v = None
        if distill_from_teacher:
            v = distill.trigflow_velocity(distill.trigflow_denoiser(teacher.denoiser(batch["teacher"], y), process, sd))
        warmup = jnp.minimum(state.step / warmup_steps, 1.0)
        loss = distill.scm_loss(
            distill.edm_as_trigflow(teacher.apply(p["net"], y), sd),
            batch["x"],
            k,
            sigma_data=sd,
            teacher_velocity=v,
            warmup=warmup,
            log_weight=log_weight(p["weight"]),
            tangent_c=tangent_c,
            p_mean=p_mean,
            p_std=p_std,
            t_min=t_min,
            t_max=t_max,
        )
        return jnp.mean(loss), {}

    start = time.perf_counter()
    params = {"net": teacher.params, "weight": {"w": jnp.zeros((num_features,)), "b": jnp.zeros(())}}
    batches = data_batches(data, batch_size, seed, {"teacher": teacher.params} if distill_from_teacher else None)
    state, history = fit_student(loss_fn, params, batches, steps, learning_rate, key, "scm")
    t_mid = process.t_from_log_snr(-2.0 * jnp.log(sd * jnp.tan(jnp.asarray(mid_time, jnp.float32))))

    def sample(p, k, x_T, y=None, steps=1):
        ts = jnp.stack([jnp.asarray(process.t_max, jnp.float32), t_mid])[:steps]
        return distill.consistency_sample(teacher.denoiser(p["net"], y), process, x_T, k, ts)[0]

    return Student("scd" if distill_from_teacher else "sct", state.params, sample, time.perf_counter() - start, history)
