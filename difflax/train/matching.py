"""Runners for distribution matching distillation: DMD (Yin et al. 2024) and DMD2 (Yin et al. 2024b).
The losses are in :mod:`difflax.distill.dmd`; every runner returns a :class:`~difflax.train.students.Student`
like those of :mod:`difflax.train.distill`.
"""

from __future__ import annotations

import itertools
import time

import jax
import jax.numpy as jnp

from difflax import distill
from difflax.models import FeatureCritic
from difflax.train.fit import fit
from difflax.train.students import Network, Student, optimizer, teacher_pairs

__all__ = ["dmd", "dmd2"]


# ------------------------------------------------------------------ distribution matching distillation
def dmd(
    teacher: Network,
    key,
    *,
    data=None,
    steps: int = 1000,
    batch_size: int = 64,
    learning_rate: float = 1e-4,
    fake_updates: int = 1,
    gan_weight: float = 0.0,
    critic_weight: float = 0.0,
    regression_weight: float = 0.25,
    num_pairs: int = 1024,
    pair_solver: str = "heun",
    pair_steps: int = 18,
    fake_weighting: str = "edm",
    generator_times: tuple | None = None,
    seed: int = 0,
) -> Student:
    """Distribution matching distillation (Yin et al. 2024) into a one- or few-step generator; DMD2
    (Yin et al. 2024b) with ``fake_updates > 1``, a GAN head (``gan_weight``, ``critic_weight``) and no
    regression (:func:`dmd2` sets these).

    The generator is the teacher's network evaluated at the levels ``generator_times`` ``t_0 > t_1 > ...``
    (default ``(t_max,)``): ``G_0 = D(x_T sigma(t_0) / sigma(t_max), t_0)``, and with more levels
    ``G_j = D(alpha_j G_{j-1} + sigma_j eps, t_j)``. An EDM teacher is poor at ``sigma = 80``, a level its
    log-normal training rarely visits, so a lower ``t_0`` gives a better start. Every level's output is
    trained to be a sample: each training example starts at a random level whose input comes from the
    generator's own earlier levels (DMD2's backward simulation), so sampling with ``n`` steps runs the
    first ``n`` levels.

    The fake denoiser starts as a second copy of the teacher. Both train with one loss (see
    :mod:`difflax.train.fit`): the distribution-matching gradient, ``gan_weight`` times the generator's
    GAN loss, ``regression_weight`` times the L2 regression to ``num_pairs`` teacher (noise, sample) pairs;
    the fake denoiser's denoising loss plus ``critic_weight`` times the discriminator loss of a
    :class:`~difflax.models.FeatureCritic` head on its bottleneck features, which tells noised ``data``
    (its labels are the generator's) from noised samples. ``fake_updates = k`` updates the generator at
    every ``k``-th step only (two time-scale update): the fake denoiser then tracks the generator's
    distribution, which the distribution-matching gradient needs without the regression.
    """
    if fake_updates < 1:
        raise ValueError(f"fake_updates must be >= 1; got {fake_updates}.")
    gan = gan_weight > 0 or critic_weight > 0
    if gan and data is None:
        raise ValueError("a GAN head (gan_weight or critic_weight > 0) needs the teacher's training data: pass data.")
    process = teacher.process
    shape = teacher.example_shape
    t_max = float(process.t_max)
    levels = tuple(float(t) for t in (generator_times or (t_max,)))
    if any(not process.t_min < t <= t_max for t in levels) or any(a <= b for a, b in itertools.pairwise(levels)):
        raise ValueError(f"generator_times must decrease within ({process.t_min}, {t_max}]; got {levels}.")
    k_pairs, k_head, k_fit = jax.random.split(key, 3)
    ref = teacher_pairs(teacher, k_pairs, num_pairs, pair_solver, pair_steps) if regression_weight else None
    scale = process.sigma(jnp.float32(levels[0])) / process.sigma(jnp.float32(t_max))
    head = FeatureCritic()

    def generate(p, x_in, t, y):
        return teacher.denoiser(p, y)(x_in, t)

    def renoise(x, t, k):
        return process.marginal(x, jnp.full((x.shape[0],), t), jax.random.normal(k, x.shape, x.dtype))

    def critic(p, y):
        features = teacher.features(p["fake"], y)
        return lambda x_t, t: head.apply({"params": p["head"]}, features(x_t, t))

    def backward_simulation(p_gen, z, y, k):
        """Each example's generator input and level: a random level, reached by the generator's earlier levels."""
        x_in = [scale * z]
        for j in range(1, len(levels)):
            x0 = generate(p_gen, x_in[-1], jnp.full((z.shape[0],), levels[j - 1]), y)
            x_in.append(renoise(x0, levels[j], jax.random.fold_in(k, j)))
        level = jax.random.randint(jax.random.fold_in(k, 0), (z.shape[0],), 0, len(levels))
        x_in = jnp.stack(x_in)[level, jnp.arange(z.shape[0])]
        return jax.lax.stop_gradient(x_in), jnp.asarray(levels, jnp.float32)[level]

    def batches(step):
        batch = {"teacher": teacher.params}
        if data is not None:
            batch.update(data.batch(seed, step, batch_size))
        if ref is not None:
            idx = jax.random.randint(jax.random.fold_in(jax.random.key(seed), step), (batch_size,), 0, num_pairs)
            batch.update(noise=ref["noise"][idx], ref=ref["x0"][idx])
            if "y" in ref:
                batch["y_ref"] = ref["y"][idx]
        return batch

    def loss_fn(p, batch, k, state):
        k_z, k_y, k_sim, k_gen, k_gan, k_fake, k_critic = jax.random.split(k, 7)
        z = process.prior_sample(k_z, (batch_size, *shape))
        y = teacher.batch_labels(batch) if data is not None else teacher.labels(k_y, batch_size)
        x_in, t_in = backward_simulation(jax.lax.stop_gradient(p["gen"]), z, y, k_sim)
        frozen = jax.lax.stop_gradient(p)

        def generator_turn(p_gen):
            x = generate(p_gen, x_in, t_in, y)
            l_dm = jnp.mean(
                distill.dmd_generator_loss(
                    x, teacher.denoiser(batch["teacher"], y), teacher.denoiser(frozen["fake"], y), process, k_gen
                )
            )
            l_gan = jnp.mean(distill.dmd_generator_gan_loss(critic(frozen, y), x, process, k_gan)) if gan else 0.0
            l_reg = 0.0
            if ref is not None:
                x_ref = generate(p_gen, scale * batch["noise"], jnp.full((batch_size,), levels[0]), batch.get("y_ref"))
                l_reg = jnp.mean(distill.dmd_regression_loss(x_ref, batch["ref"]))
            loss = l_dm + gan_weight * l_gan + regression_weight * l_reg
            return jax.lax.stop_gradient(x), loss, {"gen": l_dm, "gen_gan": l_gan, "regression": l_reg}

        def fake_turn(p_gen):
            x = jax.lax.stop_gradient(generate(p_gen, x_in, t_in, y))
            return x, jnp.zeros(()), {"gen": jnp.zeros(()), "gen_gan": jnp.zeros(()), "regression": jnp.zeros(())}

        if fake_updates == 1:
            x, l_g, metrics = generator_turn(p["gen"])
        else:
            turn = state.step % fake_updates == fake_updates - 1
            x, l_g, metrics = jax.lax.cond(turn, generator_turn, fake_turn, p["gen"])
        l_fake = jnp.mean(
            distill.dmd_fake_loss(teacher.denoiser(p["fake"], y), process, x, k_fake, weighting=fake_weighting)
        )
        l_critic = 0.0
        if gan:
            l_critic = jnp.mean(distill.dmd_critic_loss(critic(p, y), x, batch["x"], process, k_critic))
        metrics = {**metrics, "fake": l_fake, "critic": l_critic}
        return l_g + l_fake + critic_weight * l_critic, metrics

    start = time.perf_counter()
    params = {"gen": teacher.params, "fake": teacher.params}
    if gan:
        features = jax.eval_shape(
            lambda x: teacher.features(teacher.params, teacher.labels(jax.random.key(0), 1))(x, jnp.ones((1,))),
            jnp.zeros((1, *shape)),
        )
        params["head"] = head.init(k_head, jnp.zeros(features.shape, features.dtype))["params"]
    tx = optimizer(learning_rate, steps, generator_every=fake_updates)
    state, history = fit(
        loss_fn, params, tx, batches, steps, key=k_fit, log_every=_log_every(steps, fake_updates), desc="dmd"
    )

    def sample(p, k, x_T, y=None, steps=1):
        if not 1 <= steps <= len(levels):
            raise ValueError(f"this generator has {len(levels)} level(s) (generator_times); got steps={steps}.")
        x = generate(p["gen"], scale * x_T, jnp.full((x_T.shape[0],), levels[0]), y)
        for j in range(1, steps):
            x = generate(
                p["gen"], renoise(x, levels[j], jax.random.fold_in(k, j)), jnp.full((x_T.shape[0],), levels[j]), y
            )
        return x

    return Student("dmd", state.params, sample, time.perf_counter() - start, history)


def _log_every(steps: int, generator_every: int) -> int:
    """A tenth of the run, rounded to whole generator turns, so that the log shows the generator's losses."""
    return max(steps // 10 // generator_every, 1) * generator_every


def dmd2(
    teacher: Network,
    data,
    key,
    *,
    fake_updates: int = 5,
    gan_weight: float = 3e-3,
    critic_weight: float = 1e-2,
    regression_weight: float = 0.0,
    **kwargs,
) -> Student:
    """DMD2 (Yin et al. 2024b): :func:`dmd` with the two time-scale update (5 fake-denoiser steps per
    generator step), the GAN head on the fake denoiser's features trained on ``data``, and no regression
    loss; the weights are the paper's ImageNet ones (generator GAN 3e-3, discriminator 1e-2)."""
    return dmd(
        teacher,
        key,
        data=data,
        fake_updates=fake_updates,
        gan_weight=gan_weight,
        critic_weight=critic_weight,
        regression_weight=regression_weight,
        **kwargs,
    )
