"""Adversarial knowledge distillation (Adv-KD): a one-pass student that reproduces a teacher's trajectory.

Mekonnen, Dall'Asen & Rota, "Adv-KD: Adversarial knowledge distillation for faster
diffusion sampling" (2023). The teacher ``x_T -> x_{t_1} -> ... -> x_0`` applies one network
many times; the student is a chain of small submodules

    y_n = f_n(y_{n+1}),   y_0 = f_0(f_1(... f_{N-1}(y_N) ...)),   y_N = x_T,

evaluated once, front to back, whose intermediate outputs are supervised by the teacher's
states at chosen time steps, downsampled to the submodule's resolution (the student starts
at low resolution and upsamples as it denoises):

    x'_n = Psi(x_{t_n}, n)                       (here: average pooling by the stage's factor)
    L_n  = J(y_n, x'_n)                          (paper eq. 8)

The paper takes ``J`` to be the Wasserstein GAN loss with one critic ``D_n`` per stage
(paper eq. 9), the teacher intermediates being the real samples and the stage outputs the
fake ones,

    L(D_n, G_n) = E_real[D_n(x'_n)] - E_fake[D_n(y_n)],

and names mean squared error as the alternative. This module gives both, the Lipschitz
constraint of the critic as the gradient penalty of WGAN-GP (Gulrajani et al. 2017,
"Improved training of Wasserstein GANs", alg. 1, ``lambda = 10``),

    L_D^n = E[D_n(y_n)] - E[D_n(x'_n)] + lambda E[(|grad_x D_n(x_hat)|_2 - 1)^2],
    x_hat = e x'_n + (1 - e) y_n,   e ~ U[0, 1] per example,
    L_G^n = -E[D_n(y_n)],
    L_R^n = E[|y_n - x'_n|^2] / dim          (optional regression to the paired target),

and :func:`advkd_loss` sums them over the stages in the one-loss form of two-player games
(:mod:`difflax.train.fit`): ``L_D(phi, sg(theta)) + w_adv L_G(sg(phi), theta) + w_reg L_R(theta)``,
so one gradient of the sum gives the critics ``phi`` their loss's gradient and the student
``theta`` its own.

Time steps (paper sec. 3 and 4.1): with a 1000-step DDPM teacher the 11 internal submodules
target ``t_n = 190 n - 10 n^2 + 80`` for ``n = 0 .. 10`` (:func:`advkd_timesteps`); the
student produces ``y_10`` first (the noisiest, ``t = 980``) and ``y_0`` (``t = 80``) last,
then one more submodule produces the sample, supervised by the teacher's final output.
The parabola peaks at ``n = 9.5``, so ``n = 9`` and ``n = 10`` both give ``t = 980``: the
paper's first two submodules share a target.

Everything here is a pure function of callables (``student(z) -> stage outputs``,
``critic(x) -> scores``); the networks live in :mod:`difflax.models.advkd`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from difflax.processes import DiscreteVP

Array = jax.Array

__all__ = [
    "PAPER_NUM_STAGES",
    "advkd_loss",
    "advkd_timesteps",
    "critic_loss",
    "downsample",
    "downsample_targets",
    "generator_loss",
    "gradient_penalty",
    "interpolates",
    "stage_factors",
    "stage_times",
]

PAPER_NUM_STAGES = 11


# ---------------------------------------------------------------------------- time steps
def advkd_timesteps(num_stages: int = PAPER_NUM_STAGES, num_timesteps: int = 1000) -> np.ndarray:
    """Teacher time steps of the internal submodules, in the order the student produces them.

    ``t_n = 190 n - 10 n^2 + 80`` (Adv-KD, sec. 3, eq. 7 and sec. 4.1) for
    ``n = num_stages - 1, ..., 1, 0``: noisiest first, ``t_0 = 80`` last. The default
    ``num_stages=11`` is the paper's ``[980, 980, 960, 920, 860, 780, 680, 560, 420, 260, 80]``;
    fewer stages keep the cleanest ones (``n < num_stages``). For a table of
    ``num_timesteps != 1000`` steps the values are scaled by ``num_timesteps / 1000`` and
    rounded. The final submodule (the sample) has no entry here: it targets the teacher's
    output.

    Raises:
      ValueError: ``num_stages`` outside ``[1, 11]`` (beyond ``n = 10`` the parabola turns
        back towards the data) or ``num_timesteps < 1``.
    """
    if not isinstance(num_stages, (int, np.integer)) or not 1 <= num_stages <= PAPER_NUM_STAGES:
        raise ValueError(f"num_stages must be an int in [1, {PAPER_NUM_STAGES}]; got {num_stages!r}.")
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int; got {num_timesteps!r}.")
    n = np.arange(num_stages - 1, -1, -1)
    t = 190 * n - 10 * n**2 + 80
    if num_timesteps != 1000:
        t = np.rint(t * (num_timesteps / 1000.0))
        t = np.clip(t, 0, num_timesteps - 1)
    return t.astype(np.int32)


def stage_times(process, timesteps, num_timesteps: int = 1000) -> np.ndarray:
    """Continuous process times of DDPM step indices ``timesteps``, as float64 numpy.

    For a :class:`~difflax.processes.DiscreteVP` with ``num_timesteps`` steps this is its own
    ``time_from_timestep(n) = (n + 1) / N``. Any other process gets the time with the same
    log-SNR as DDPM's linear table of ``num_timesteps`` steps (Ho et al. 2020) at step ``n``, clipped to
    ``[t_min, t_max]``: the same noise level the paper's teacher had there.
    """
    steps = np.asarray(timesteps, dtype=np.float64)
    if np.any(steps < 0) or np.any(steps > num_timesteps - 1):
        raise ValueError(f"timesteps must lie in [0, {num_timesteps - 1}]; got {steps.tolist()}.")
    if isinstance(process, DiscreteVP) and process.num_steps == num_timesteps:
        return np.asarray(process.time_from_timestep(steps), dtype=np.float64)
    reference = DiscreteVP.linear(num_timesteps)
    log_snr = reference.log_snr(reference.time_from_timestep(steps))
    t = np.asarray(process.t_from_log_snr(log_snr), dtype=np.float64)
    return np.clip(t, float(process.t_min), float(process.t_max))


# ---------------------------------------------------------------------------- resolutions
def stage_factors(num_outputs: int, spatial_shape: Sequence[int] = (), min_size: int = 2) -> tuple[int, ...]:
    """Downsampling factor of each student output, coarsest first, the last one ``1`` (full size).

    With ``L`` the number of halvings that keep every spatial side an integer of at least
    ``min_size``, output ``s`` of ``S`` has factor ``2^round(L (S - 1 - s) / (S - 1))``: the
    resolution doubles as evenly as the number of stages allows, from the coarsest to full
    size. Flat data (``spatial_shape == ()``, e.g. 2-D toys) has no resolution: all factors
    are 1.
    """
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1; got {num_outputs}.")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1; got {min_size}.")
    sides = [int(s) for s in spatial_shape]
    levels = 0
    while sides and all(s % 2 ** (levels + 1) == 0 and s // 2 ** (levels + 1) >= min_size for s in sides):
        levels += 1
    if num_outputs == 1 or levels == 0:
        return (1,) * num_outputs
    return tuple(2 ** round(levels * (num_outputs - 1 - s) / (num_outputs - 1)) for s in range(num_outputs))


def downsample(x: Array, factor: int) -> Array:
    """Average pooling by ``factor`` over the spatial axes of ``x``: ``Psi`` of the paper.

    ``x`` is ``(batch, *spatial, channels)`` (NHWC for images); for ``x.ndim <= 2`` (flat
    data) there are no spatial axes and ``factor`` must be 1 (the identity).
    """
    if factor == 1:
        return x
    if x.ndim <= 2:
        raise ValueError(f"flat data of shape {x.shape} has no resolution to reduce; factor must be 1, got {factor}.")
    spatial = x.shape[1:-1]
    if any(s % factor for s in spatial):
        raise ValueError(f"factor {factor} must divide the spatial shape {spatial}.")
    shape = [x.shape[0]]
    for s in spatial:
        shape += [s // factor, factor]
    shape.append(x.shape[-1])
    return x.reshape(shape).mean(axis=tuple(range(2, 2 * len(spatial) + 1, 2)))


def downsample_targets(intermediates, factors: Sequence[int]) -> tuple[Array, ...]:
    """The teacher states ``(num_outputs, batch, ...)`` (or a sequence) pooled to each output's resolution."""
    if len(intermediates) != len(factors):
        raise ValueError(f"got {len(intermediates)} teacher states for {len(factors)} stage factors.")
    return tuple(downsample(jnp.asarray(x), int(f)) for x, f in zip(intermediates, factors, strict=True))


# ---------------------------------------------------------------------------- losses
def _scores(critic: Callable, x: Array) -> Array:
    s = jnp.asarray(critic(x))
    if s.ndim > 1:
        s = s.reshape(s.shape[0], -1)
        if s.shape[1] != 1:
            raise ValueError(f"a critic returns one score per example; got shape {s.shape}.")
        s = s[:, 0]
    return s


def critic_loss(critic: Callable, real: Array, fake: Array) -> Array:
    """WGAN critic loss without the penalty: ``E[D(fake)] - E[D(real)]`` (minimized by the critic).

    Its negative is the critic's estimate of the Wasserstein-1 distance (Kantorovich-Rubinstein
    duality, Arjovsky et al. 2017); it is exactly 0 when ``real`` and ``fake`` coincide.
    """
    return jnp.mean(_scores(critic, fake)) - jnp.mean(_scores(critic, real))


def generator_loss(critic: Callable, fake: Array) -> Array:
    """WGAN generator (student) loss ``-E[D(fake)]``."""
    return -jnp.mean(_scores(critic, fake))


def interpolates(real: Array, fake: Array, key: Array) -> Array:
    """``x_hat = e real + (1 - e) fake`` with one ``e ~ U[0, 1]`` per example (WGAN-GP, alg. 1)."""
    if real.shape != fake.shape:
        raise ValueError(f"real and fake must have the same shape; got {real.shape} and {fake.shape}.")
    e = jax.random.uniform(key, (real.shape[0],) + (1,) * (real.ndim - 1), dtype=real.dtype)
    return e * real + (1.0 - e) * fake


def gradient_penalty(critic: Callable, real: Array, fake: Array, key: Array, weight: float = 10.0) -> Array:
    """WGAN-GP penalty ``lambda E[(|grad_x D(x_hat)|_2 - 1)^2]`` at :func:`interpolates` (Gulrajani et al. 2017).

    The per-example input gradient is ``jax.grad`` of ``sum_i D(x_hat_i)``, which is exact
    for a critic that treats examples independently (no batch normalization: the paper's
    requirement too). The norm is taken over all non-batch axes; ``weight`` is ``lambda``.
    """
    x_hat = interpolates(real, fake, key)
    grads = jax.grad(lambda x: jnp.sum(_scores(critic, x)))(x_hat)
    sq = jnp.sum(jnp.square(grads.reshape(grads.shape[0], -1)), axis=1)
    norms = jnp.sqrt(sq + jnp.finfo(sq.dtype).tiny)  # finite gradient at a zero input gradient
    return weight * jnp.mean(jnp.square(norms - 1.0))


def advkd_loss(
    student: Callable,
    critic: Callable,
    params,
    noise: Array,
    targets: Sequence[Array],
    key: Array,
    *,
    adversarial_weight: float = 1.0,
    regression_weight: float = 0.0,
    gp_weight: float = 10.0,
    stage_weights: Sequence[float] | None = None,
):
    """Adv-KD loss of both players, ``params = {"student": theta, "critic": phi}``, in one scalar.

    ``student(theta, noise) -> (y_{first}, ..., y_{last})`` are the stage outputs,
    ``critic(phi, n, x) -> (batch,)`` the scores of the critic of stage ``n``, ``targets``
    the teacher states already at each stage's resolution (:func:`downsample_targets`).
    With ``sg`` the stop-gradient and ``w_n`` the ``stage_weights`` (default 1):

        L = sum_n w_n [ L_D^n(phi; sg(y_n)) + w_adv L_G^n(sg(phi); y_n) + w_reg L_R^n(y_n) ],

    so ``d L / d phi`` is the critics' WGAN-GP gradient and ``d L / d theta`` the student's
    adversarial plus regression gradient. ``adversarial_weight=0`` gives plain regression
    (the critics are then not evaluated and get zero gradients).

    Returns:
      ``(loss, metrics)`` with, per stage ``n``, ``w_dist_n = E[D(x'_n)] - E[D(y_n)]`` (the
      critic's Wasserstein estimate), ``gp_n`` and ``mse_n``, and their sums.
    """
    if not {"student", "critic"} <= set(params):
        raise ValueError(f"params must hold 'student' and 'critic'; got keys {sorted(params)}.")
    outputs = tuple(student(params["student"], noise))
    if len(outputs) != len(targets):
        raise ValueError(f"the student made {len(outputs)} stage outputs for {len(targets)} targets.")
    weights = (1.0,) * len(outputs) if stage_weights is None else tuple(stage_weights)
    if len(weights) != len(outputs):
        raise ValueError(f"stage_weights has {len(weights)} entries for {len(outputs)} stages.")
    adversarial = not (isinstance(adversarial_weight, (int, float)) and adversarial_weight == 0)
    frozen = jax.lax.stop_gradient(params["critic"])
    keys = jax.random.split(key, len(outputs))
    total, metrics = 0.0, {}
    sums = {"w_dist": 0.0, "gp": 0.0, "mse": 0.0}
    for n, (w, y, x, k) in enumerate(zip(weights, outputs, targets, keys, strict=True)):
        if y.shape != x.shape:
            raise ValueError(f"stage {n}: output of shape {y.shape} does not match its target {x.shape}.")
        mse = jnp.mean(jnp.square(y - x))
        stage = regression_weight * mse
        metrics[f"mse_{n}"] = mse
        sums["mse"] += mse
        if adversarial:

            def d_train(z, n=n):
                return critic(params["critic"], n, z)

            def d_frozen(z, n=n):
                return critic(frozen, n, z)

            y_sg = jax.lax.stop_gradient(y)
            d_loss = critic_loss(d_train, x, y_sg)
            gp = gradient_penalty(d_train, x, y_sg, k, gp_weight)
            stage = stage + d_loss + gp + adversarial_weight * generator_loss(d_frozen, y)
            metrics[f"w_dist_{n}"] = -d_loss
            metrics[f"gp_{n}"] = gp
            sums["w_dist"] += -d_loss
            sums["gp"] += gp
        total = total + w * stage
    metrics.update({k: v for k, v in sums.items() if adversarial or k == "mse"})
    return jnp.asarray(total), metrics
