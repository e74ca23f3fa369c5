"""Consistency models: distillation and training (Song et al. 2023; Song & Dhariwal 2024).

A consistency function maps any point of a probability-flow ODE trajectory to its end:
``f(x_t, t) = x_{t_min}``. Everything here works in the scaled variables of Karras et al.
(2022), ``y = x_t / alpha(t)`` with noise level ``s = sigma(t) / alpha(t)``, where the ODE is
``dy/ds = (y - D(y, s)) / s`` for every process; for :class:`~difflax.processes.EDM` and VE,
``y = x_t`` and ``s = sigma``.

* Boundary condition by construction (Song et al. 2023, eq. 5 and app. C):
  ``f(x, s) = c_skip(s) y + c_out(s) F(c_in(s) y, c_noise(s))`` with
  ``c_skip = sd^2 / ((s - s_min)^2 + sd^2)`` and ``c_out = (s - s_min) sd / sqrt(s^2 + sd^2)``,
  so ``f(x, s_min) = y`` exactly; ``c_in`` and ``c_noise`` are EDM's, so a student starts
  from an EDM-preconditioned teacher's ``F``.
* Noise levels ``s_1 < ... < s_N`` on the Karras grid
  ``s_i = (s_min^(1/rho) + (i-1)/(N-1) (s_max^(1/rho) - s_min^(1/rho)))^rho``.
* Loss (eq. 7 / 10): ``lambda(s_n) d(f_theta(x_{n+1}, s_{n+1}), f_theta-(x_hat_n, s_n))`` where
  ``x_{n+1} = x0 + s_{n+1} z`` and ``x_hat_n`` is one teacher ODE step from ``s_{n+1}`` to
  ``s_n`` (distillation) or ``x0 + s_n z`` with the same ``z`` (training, no teacher).
  The target ``theta-`` is an EMA of ``theta`` or ``stop_gradient(theta)`` (improved CT).
* Improved training recipe (Song & Dhariwal 2024): pseudo-Huber distance
  ``sqrt(|x - y|^2 + c^2) - c`` with ``c = 0.00054 sqrt(d)``, ``lambda(s_n) = 1 / (s_{n+1} - s_n)``,
  the discretized log-normal over ``n`` (``P_mean = -1.1``, ``P_std = 2``), the exponential
  step-count curriculum, and no EMA target.
* Easy consistency tuning (ECT, Geng et al. 2024): continuous log-normal levels, the lower level of each
  pair ``r = s (1 - n(s) / q^stage)`` shrinking stage by stage from ``s_min`` (a denoising loss, where a
  trained diffusion model already is) towards ``s``, weight ``1 / (s - r)``.
* Multistep sampling (Song et al. 2023, alg. 1).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import erf

from difflax.parametrization import edm_preconditioning
from difflax.processes import broadcast_to

__all__ = [
    "DISTANCES",
    "consistency_function",
    "consistency_loss",
    "consistency_sample",
    "ct_curriculum",
    "ct_target_decay",
    "distance",
    "ect_loss",
    "ect_pair",
    "ict_curriculum",
    "karras_levels",
    "ode_step",
    "sample_level_index",
]

DISTANCES = ("pseudo_huber", "l2", "l1")
ODE_METHODS = ("heun", "euler")


def _scaled(process, t):
    """``(alpha, s = sigma / alpha)`` at ``t``."""
    alpha, sigma = process.alpha_sigma(t)
    return alpha, sigma / alpha


def _level_range(process, dtype, s_min, s_max):
    """``(s_min, s_max)``, each defaulting to the process's noise level at ``t_min`` / ``t_max``."""
    if s_min is None:
        s_min = _scaled(process, jnp.asarray(process.t_min, dtype))[1]
    if s_max is None:
        s_max = _scaled(process, jnp.asarray(process.t_max, dtype))[1]
    return s_min, s_max


def _time_of_level(process, s):
    """Process time whose noise level ``sigma / alpha`` is ``s``."""
    return process.t_from_log_snr(-2.0 * jnp.log(s))


def consistency_function(apply_fn, process, *, sigma_data: float | None = None, s_min: float | None = None):
    """The consistency model ``f(x_t, t)`` of a raw network ``apply_fn(c_in y, c_noise)``.

    ``s_min`` (default: the process's noise level at ``t_min``) is where ``f`` is the
    identity; ``sigma_data`` defaults to the process's, else 0.5. The result follows the
    denoiser contract, so every sampler and metric takes it.
    """
    sd = sigma_data if sigma_data is not None else getattr(process, "sigma_data", 0.5)

    def f(x_t, t):
        alpha, s = _scaled(process, t)
        lo = _scaled(process, jnp.asarray(process.t_min, s.dtype))[1] if s_min is None else s_min
        _, _, c_in, c_noise = edm_preconditioning(s, sd)
        c_skip = sd**2 / ((s - lo) ** 2 + sd**2)
        c_out = (s - lo) * sd / jnp.sqrt(s**2 + sd**2)
        y = x_t / broadcast_to(alpha, x_t)
        out = apply_fn(broadcast_to(c_in, x_t) * y, c_noise)
        return broadcast_to(c_skip, x_t) * y + broadcast_to(c_out, x_t) * out

    return f


def distance(x, y, kind: str = "pseudo_huber", c: float | None = None):
    """Per-example distance: ``"pseudo_huber"`` ``sqrt(|x-y|^2 + c^2) - c`` (``c = 0.00054 sqrt(d)``
    by default), ``"l2"`` the mean squared error, ``"l1"`` the mean absolute error."""
    if kind not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}; got {kind!r}.")
    diff = (x - y).reshape(x.shape[0], -1)
    if kind == "l2":
        return jnp.mean(diff**2, axis=1)
    if kind == "l1":
        return jnp.mean(jnp.abs(diff), axis=1)
    c = 0.00054 * math.sqrt(diff.shape[1]) if c is None else c
    return jnp.sqrt(jnp.sum(diff**2, axis=1) + c**2) - c


def karras_levels(num_levels, s_min: float, s_max: float, rho: float = 7.0, max_levels: int | None = None):
    """Increasing noise levels ``s_1 < ... < s_N`` of Karras et al. (``N = num_levels``, may be traced).

    With ``max_levels`` the array has that static length and entries past ``N`` repeat ``s_max``.
    """
    size = max_levels if max_levels is not None else int(num_levels)
    dtype = jnp.result_type(s_min, s_max, jnp.float32)
    i = jnp.arange(size, dtype=dtype)
    frac = jnp.minimum(i / (jnp.asarray(num_levels, dtype) - 1.0), 1.0)
    lo, hi = s_min ** (1.0 / rho), s_max ** (1.0 / rho)
    return (lo + frac * (hi - lo)) ** rho


def sample_level_index(key, shape, levels, num_levels, kind: str = "uniform", p_mean=-1.1, p_std=2.0):
    """Indices ``n`` in ``[0, N - 2]`` of pairs ``(s_n, s_{n+1})``.

    ``"uniform"`` (Song et al. 2023) or ``"lognormal"``: ``p(n)`` proportional to
    ``erf((ln s_{n+1} - P_mean) / (sqrt 2 P_std)) - erf((ln s_n - P_mean) / (sqrt 2 P_std))``
    (Song & Dhariwal 2024, eq. 11). ``num_levels`` may be traced.
    """
    n = jnp.arange(levels.shape[0] - 1)
    valid = n < num_levels - 1
    if kind == "uniform":
        weights = valid.astype(jnp.float32)
    elif kind == "lognormal":
        cdf = erf((jnp.log(levels) - p_mean) / (math.sqrt(2.0) * p_std))
        weights = jnp.where(valid, cdf[1:] - cdf[:-1], 0.0)
    else:
        raise ValueError(f"noise must be 'uniform' or 'lognormal'; got {kind!r}.")
    logits = jnp.where(weights > 0, jnp.log(jnp.maximum(weights, 1e-30)), -jnp.inf)
    return jax.random.categorical(key, logits, shape=shape)


def ct_curriculum(step, total_steps: int, s0: int = 2, s1: int = 150):
    """Number of levels ``N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1`` (Song et al. 2023)."""
    k = jnp.asarray(step, jnp.float32)
    n = jnp.ceil(jnp.sqrt(k / total_steps * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1.0) + 1.0
    return n.astype(jnp.int32)


def ict_curriculum(step, total_steps: int, s0: int = 10, s1: int = 1280):
    """``N(k) = min(s0 2^floor(k / K'), s1) + 1`` with ``K' = floor(K / (log2 floor(s1 / s0) + 1))``
    (Song & Dhariwal 2024, eq. 8)."""
    k_prime = max(math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)), 1)
    doublings = jnp.asarray(step, jnp.int32) // k_prime
    return jnp.minimum(s0 * jnp.exp2(doublings.astype(jnp.float32)), s1).astype(jnp.int32) + 1


def ct_target_decay(num_levels, s0: int = 2, mu0: float = 0.9):
    """EMA decay of the target network ``mu(k) = exp(s0 ln(mu0) / N(k))`` (Song et al. 2023, app. C)."""
    return jnp.exp(s0 * math.log(mu0) / jnp.asarray(num_levels, jnp.float32))


def ode_step(denoise, process, x, t, t_next, method: str = "heun"):
    """One probability-flow ODE step from ``t`` to ``t_next`` (per-example times, shape ``(batch,)``).

    In scaled variables ``dy/ds = (y - D) / s``: Euler (= DDIM) or Heun's second-order
    method (Karras et al. 2022, alg. 1; the teacher step of Song et al. 2023).
    """
    if method not in ODE_METHODS:
        raise ValueError(f"method must be one of {ODE_METHODS}; got {method!r}.")
    a, s = _scaled(process, t)
    a_n, s_n = _scaled(process, t_next)
    y = x / broadcast_to(a, x)
    h = broadcast_to(s_n - s, x)
    d1 = (y - denoise(x, t)) / broadcast_to(s, x)
    y_next = y + h * d1
    if method == "heun":
        d2 = (y_next - denoise(broadcast_to(a_n, x) * y_next, t_next)) / broadcast_to(s_n, x)
        y_next = y + h * 0.5 * (d1 + d2)
    return broadcast_to(a_n, x) * y_next


def consistency_loss(
    student,
    target,
    process,
    x0,
    key,
    *,
    num_levels,
    max_levels: int,
    teacher=None,
    method: str = "heun",
    distance_kind: str = "pseudo_huber",
    weighting: str = "uniform",
    noise: str = "uniform",
    s_min: float | None = None,
    s_max: float | None = None,
    rho: float = 7.0,
):
    """Per-example consistency distillation (``teacher`` given) or training (``teacher=None``) loss.

    Args:
      student: the consistency function being trained, ``f_theta(x_t, t)``.
      target: the target ``f_theta-`` (an EMA of the student, or the student itself: its
        output is wrapped in ``stop_gradient``).
      process: the forward process (times are converted from noise levels).
      x0: data batch.
      key: PRNG key.
      num_levels: ``N``, the number of noise levels (may be traced: a curriculum does not recompile).
      max_levels: static upper bound on ``N``.
      teacher: the frozen teacher denoiser for distillation; ``None`` for consistency training.
      method: the teacher's ODE step, ``"heun"`` or ``"euler"``.
      distance_kind: one of :data:`DISTANCES`.
      weighting: ``"uniform"`` (``lambda = 1``) or ``"inverse_gap"`` (``1 / (s_{n+1} - s_n)``, iCT).
      noise: ``"uniform"`` or ``"lognormal"`` choice of ``n`` (:func:`sample_level_index`).
      s_min, s_max: noise-level range (default: the process's ``t_min`` and ``t_max`` levels).
      rho: Karras grid exponent.
    """
    if weighting not in ("uniform", "inverse_gap"):
        raise ValueError(f"weighting must be 'uniform' or 'inverse_gap'; got {weighting!r}.")
    s_min, s_max = _level_range(process, x0.dtype, s_min, s_max)
    k_n, k_z = jax.random.split(key)
    batch = x0.shape[0]
    levels = karras_levels(num_levels, s_min, s_max, rho, max_levels)
    n = sample_level_index(k_n, (batch,), levels, num_levels, noise)
    s_lo, s_hi = levels[n], levels[n + 1]
    lam = 1.0 / (s_hi - s_lo) if weighting == "inverse_gap" else jnp.ones_like(s_lo)
    z = jax.random.normal(k_z, x0.shape, x0.dtype)
    return lam * _pair_distance(student, target, process, x0, z, s_lo, s_hi, teacher, method, distance_kind)


def _pair_distance(student, target, process, x0, z, s_lo, s_hi, teacher, method, distance_kind):
    """``d(f_theta(x_hi, s_hi), sg f_theta-(x_lo, s_lo))`` with ``x_hi = x0 + s_hi z`` (scaled) and ``x_lo``
    one teacher ODE step from it (distillation) or ``x0 + s_lo z`` (training)."""
    t_lo, t_hi = _time_of_level(process, s_lo), _time_of_level(process, s_hi)
    a_hi, _ = _scaled(process, t_hi)
    x_hi = broadcast_to(a_hi, x0) * (x0 + broadcast_to(s_hi, x0) * z)
    if teacher is None:
        a_lo, _ = _scaled(process, t_lo)
        x_lo = broadcast_to(a_lo, x0) * (x0 + broadcast_to(s_lo, x0) * z)
    else:
        x_lo = jax.lax.stop_gradient(ode_step(teacher, process, x_hi, t_hi, t_lo, method))
    pred = student(x_hi, t_hi)
    goal = jax.lax.stop_gradient(target(x_lo, t_lo))
    return distance(pred, goal, distance_kind)


def ect_pair(s, stage, s_min, *, q: float = 2.0, k: float = 8.0, b: float = 1.0):
    """ECT's smaller level ``r`` for level ``s`` at curriculum stage ``stage`` (Geng et al. 2024, eq. 9):
    ``r = max(s (1 - n(s) / q^stage), s_min)`` with ``n(s) = 1 + k sigmoid(-b s)``. At stage 0, ``r = s_min``
    for every ``s`` (the loss is a denoising loss, the teacher's own objective); each stage divides the
    gap ``s - r`` by ``q``, towards the continuous-time limit."""
    ratio = 1.0 - (1.0 + k * jax.nn.sigmoid(-b * s)) / jnp.asarray(q, s.dtype) ** stage
    return jnp.maximum(s * ratio, s_min)


def ect_loss(
    student,
    target,
    process,
    x0,
    key,
    *,
    stage,
    teacher=None,
    method: str = "heun",
    distance_kind: str = "pseudo_huber",
    q: float = 2.0,
    p_mean: float = -1.1,
    p_std: float = 2.0,
    s_min: float | None = None,
    s_max: float | None = None,
):
    """Per-example easy consistency tuning loss (ECT, Geng et al. 2024): consistency training
    (``teacher=None``) or distillation on continuous levels, ``ln s ~ N(P_mean, P_std^2)`` clipped to
    ``[2 s_min, s_max]``, the pair's lower level from :func:`ect_pair` at ``stage`` (may be traced), and
    the weight ``1 / (s - r)``. Started from a trained diffusion model, stage 0 is that model's fixed point:
    ``f(x_s, s) = E[x0 | x_s]`` is what the pair ``(s, s_min)`` asks for."""
    s_min, s_max = _level_range(process, x0.dtype, s_min, s_max)
    k_s, k_z = jax.random.split(key)
    batch = x0.shape[0]
    s_hi = jnp.clip(jnp.exp(p_mean + p_std * jax.random.normal(k_s, (batch,), x0.dtype)), 2 * s_min, s_max)
    s_lo = ect_pair(s_hi, stage, s_min, q=q)
    z = jax.random.normal(k_z, x0.shape, x0.dtype)
    return _pair_distance(student, target, process, x0, z, s_lo, s_hi, teacher, method, distance_kind) / (s_hi - s_lo)


def consistency_sample(f, process, x_T, key, ts):
    """Multistep consistency sampling (Song et al. 2023, alg. 1) on decreasing times ``ts``.

    ``x = f(x_T, ts[0])``, then for each later ``t``: ``x_t = alpha_t (x + sqrt(s_t^2 - s_min^2) z)``
    and ``x = f(x_t, t)``. One evaluation of ``f`` per time; ``len(ts) = 1`` is one-step
    generation. Returns ``(x, info)`` with ``info["nfe"]``.
    """
    ts = jnp.asarray(ts)
    batch = x_T.shape[0]
    x = f(x_T, jnp.full((batch,), ts[0], x_T.dtype))
    s_min = _scaled(process, jnp.asarray(process.t_min, x_T.dtype))[1]
    if ts.shape[0] > 1:
        keys = jax.random.split(key, ts.shape[0] - 1)

        def body(x, inputs):
            t, k = inputs
            a, s = _scaled(process, t)
            noise = jnp.sqrt(jnp.maximum(s**2 - s_min**2, 0.0)) * jax.random.normal(k, x.shape, x.dtype)
            return f(a * (x + noise), jnp.full((batch,), t, x.dtype)), None

        x, _ = jax.lax.scan(body, x, (ts[1:], keys))
    return x, {"nfe": ts.shape[0]}
