"""Reverse-time SDE samplers: Euler-Maruyama, predictor-corrector and annealed Langevin dynamics.

All three read the score from the denoiser by Tweedie's formula,
``score(x, t) = (alpha(t) x0_hat - x) / sigma(t)^2``, so they work with any process
and any network parametrization.

* :class:`EulerMaruyama`: the reverse-time SDE of Song et al. 2021 (eq. 6),
  ``dx = [f(t) x - g(t)^2 score(x, t)] dt + g(t) dw_bar``, integrated from ``t`` to
  ``t_next < t`` with drift and diffusion frozen at ``t`` (score_sde's
  ``EulerMaruyamaPredictor``). One evaluation per step.
* :class:`PC`: predictor-corrector sampling (Song et al. 2021, algorithms 2 (VE) and
  3 (VP)). As in score_sde's ``pc_sampler`` each step first runs
  ``corrector_steps`` Langevin corrector steps at ``t``, then one predictor step from
  ``t`` to ``t_next``; NFE per step is ``corrector_steps + 1`` (``corrector_steps``
  with ``predictor="none"``).

  - Langevin corrector (score_sde's ``LangevinCorrector``):
    ``x <- x + e score + sqrt(2 e) z`` with the signal-to-noise step size
    ``e = 2 a (snr ||z|| / ||score||)^2``, where ``a = (alpha(t) / alpha(t_next))^2``
    is the ``alpha_i = 1 - beta_i`` of the discrete VP chain (exactly so for a
    discrete VP table, to first order for continuous VP; ``1`` for VE/EDM).
    score_sde averages the two norms over the batch (``norm="batch"``, the default).
    ``norm="example"`` takes them per example instead, so every example's chain is
    independent of the others: results do not depend on the batch size, on ``vmap``
    or on how the batch is sharded. The price is a state-dependent step size
    ``e(x) ~ 1 / ||score(x)||^2``, and Langevin dynamics with a state-dependent step
    (without the divergence correction) leaves ``p / e`` rather than ``p`` invariant:
    an ``O(1/D)`` bias that is negligible for images (``D`` in the thousands, where
    the norms concentrate) but measurable in low dimension, and in a handful of dimensions
    ``||score||`` is sometimes near zero and the step explodes
    (``1 / chi^2_2`` has no mean). Prefer ``norm="example"`` for high-dimensional data
    that must not couple examples.
  - ``predictor="reverse_diffusion"`` (score_sde's ``ReverseDiffusionPredictor``) uses
    the discrete forward step between ``t_next`` and ``t``,
    ``x_t = a x_next + b z`` with ``a = alpha(t) / alpha(t_next)`` and
    ``b^2 = sigma(t)^2 - a^2 sigma(t_next)^2``: with ``f = (a - 1) x`` and ``G = b``,
    ``x <- x - f + G^2 score + G z``. ``predictor="euler_maruyama"`` is the
    :class:`EulerMaruyama` step; ``predictor="none"`` runs the corrector only.
* :class:`ALD`: annealed Langevin dynamics of NCSN (Song & Ermon 2019, algorithm 1, in
  the form of their code): at every noise level of the grid ``n_steps_each`` steps
  ``y <- y + e_i score_y + sqrt(2 e_i) z`` with ``e_i = step_lr (s_i / s_L)^2``.

Noise levels and the Langevin step of :class:`ALD` live in the *scaled* coordinates
``y = x / alpha``, ``s = sigma / alpha`` (for VE/EDM these are ``x`` and ``sigma``
themselves), so the same ``step_lr`` means the same thing for every process.

The final denoising step ``x0 = D(x, t_min)`` of the sampling loop plays the role of
score_sde's ``denoise=True`` (returning ``x_mean`` of the last step) and of NCSNv2's
final denoising step.

Note: for the flow interpolant (:class:`difflax.Flow`) the reverse SDE is singular at
``t = 1`` (``f = -1/(1 - t)``); start these samplers from a time below 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from difflax import pytree
from difflax.checks import check_choice, check_nonnegative_int, check_positive_int
from difflax.solvers.base import Solver, Step, call, separate_final
from difflax.transitions import coefficients, forward_std

__all__ = ["ALD", "PC", "EulerMaruyama", "score_from_x0"]

_PREDICTORS = ("reverse_diffusion", "euler_maruyama", "none")


def score_from_x0(x, x0, alpha, sigma):
    """Tweedie: ``grad log p_t(x) = (alpha x0_hat - x) / sigma^2``."""
    return (alpha * x0 - x) / sigma**2


def _score(denoise, process, x, t):
    alpha, sigma = process.alpha_sigma(t)
    return score_from_x0(x, call(denoise, x, t), alpha, sigma)


def _per_example_norm(v):
    """Euclidean norm over all but the first (batch) axis, shaped to broadcast against ``v``."""
    return jnp.sqrt(jnp.sum(v**2, axis=tuple(range(1, v.ndim)), keepdims=True))


def _em_step(denoise, process, x, t, t_next, key):
    """Euler-Maruyama on the reverse-time SDE from ``t`` to ``t_next < t``."""
    score = _score(denoise, process, x, t)
    f, g = process.sde_coefficients(t)
    dt = t_next - t  # negative
    z = jax.random.normal(key, x.shape, x.dtype)
    return (x + (f * x - g**2 * score) * dt + g * jnp.sqrt(-dt) * z).astype(x.dtype)


@pytree.dataclass
class EulerMaruyama(Solver):
    """Euler-Maruyama on the reverse-time SDE (Song et al. 2021): 1 NFE per step."""

    stochastic = True
    default_grid = "uniform"

    def step(self, denoise, process, x, state, step: Step):
        return _em_step(denoise, process, x, step.t, step.t_next, step.key), state


@pytree.dataclass
class PC(Solver):
    """Predictor-corrector sampler of Song et al. 2021 (score_sde's ``pc_sampler``).

    Attributes:
      snr: signal-to-noise ratio of the Langevin corrector (traced). score_sde uses
        0.16 for its CIFAR-10 VE and VP configs (0.17 CelebA, 0.075 for the
        high-resolution VE models).
      predictor: ``"reverse_diffusion"`` (default), ``"euler_maruyama"`` or ``"none"`` (static).
      corrector_steps: Langevin corrector steps per grid point (static, ``0`` disables
        the corrector).
      norm: ``"batch"`` (default, as score_sde) or ``"example"``: where the norms of the
        corrector's step-size rule are taken (static; see the module docstring).
    """

    snr: float = 0.16
    predictor: str = pytree.field(static=True, default="reverse_diffusion")
    corrector_steps: int = pytree.field(static=True, default=1)
    norm: str = pytree.field(static=True, default="batch")
    stochastic = True
    default_grid = "uniform"

    def __post_init__(self):
        check_choice(self.predictor, _PREDICTORS, "predictor")
        check_nonnegative_int(self.corrector_steps, "corrector_steps")
        check_choice(self.norm, ("example", "batch"), "norm")

    @property
    def evals_per_step(self) -> int:
        return self.corrector_steps + (self.predictor != "none")

    def _corrector(self, denoise, process, x, t, t_next, key):
        a = (process.alpha(t) / process.alpha(t_next)) ** 2  # alpha_i = 1 - beta_i of score_sde

        def body(j, x):
            score = _score(denoise, process, x, t)
            z = jax.random.normal(jax.random.fold_in(key, j), x.shape, x.dtype)
            grad_norm, noise_norm = _per_example_norm(score), _per_example_norm(z)
            if self.norm == "batch":
                grad_norm, noise_norm = jnp.mean(grad_norm), jnp.mean(noise_norm)
            grad_norm = jnp.maximum(grad_norm, jnp.finfo(score.dtype).tiny)
            step_size = 2.0 * a * (self.snr * noise_norm / grad_norm) ** 2
            return (x + step_size * score + jnp.sqrt(2.0 * step_size) * z).astype(x.dtype)

        return jax.lax.fori_loop(0, self.corrector_steps, body, x)

    def _reverse_diffusion(self, denoise, process, x, t, t_next, key):
        s, c = coefficients(process, t), coefficients(process, t_next)
        score = _score(denoise, process, x, t)
        a = s.alpha / c.alpha
        b = forward_std(s, c)  # b^2 = sigma_t^2 - a^2 sigma_next^2, without cancellation
        z = jax.random.normal(key, x.shape, x.dtype)
        return (x - (a - 1.0) * x + b**2 * score + b * z).astype(x.dtype)

    def step(self, denoise, process, x, state, step: Step):
        corrector_key, predictor_key = jax.random.split(step.key)
        if self.corrector_steps:
            x = self._corrector(denoise, process, x, step.t, step.t_next, corrector_key)
        if self.predictor == "reverse_diffusion":
            x = self._reverse_diffusion(denoise, process, x, step.t, step.t_next, predictor_key)
        elif self.predictor == "euler_maruyama":
            x = _em_step(denoise, process, x, step.t, step.t_next, predictor_key)
        return x, state

    def advance(self, denoise, process, x, state, step: Step):
        """The corrector evaluates inside its loop: the final denoising step is a branch of its own."""
        return separate_final(self, denoise, process, x, state, step)


@pytree.dataclass
class ALD(Solver):
    """Annealed Langevin dynamics (NCSN; Song & Ermon 2019, algorithm 1).

    Every step moves the sample to the next grid time ``t_next`` (rescaling ``x`` by
    ``alpha(t_next) / alpha(t)`` so the scaled sample ``y = x / alpha`` is unchanged)
    and runs ``n_steps_each`` Langevin steps there in the scaled coordinates,

        ``y <- y + e_i grad_y log p(y; s_i) + sqrt(2 e_i) z``,  ``e_i = step_lr (s_i / s_L)^2``,

    with ``s = sigma / alpha`` and ``s_L`` the scaled noise level at the process's
    ``t_min`` (the last level of every named grid). This is the update of the NCSN /
    NCSNv2 code (``step_size * grad + sqrt(2 step_size) noise``); the paper's ``alpha_i``
    is ``2 e_i``. The starting sample ``x_T`` is taken as a draw at ``ts[0]``; the
    levels visited are ``ts[1:]`` (positive part), then the final denoising step.

    Attributes:
      step_lr: base step size ``e`` at the smallest level (traced). NCSN used
        ``2e-5`` (CIFAR-10, ``s_L = 0.01``); NCSNv2 ``6.2e-6`` for CIFAR-10. Stability
        needs ``step_lr / s_L^2`` well below 1 in data units.
      n_steps_each: Langevin steps per noise level (static; NCSNv2 uses 5, NCSN 100).
    """

    step_lr: float = 2e-5
    n_steps_each: int = pytree.field(static=True, default=5)
    stochastic = True
    default_grid = "uniform"

    def __post_init__(self):
        check_positive_int(self.n_steps_each, "n_steps_each")

    @property
    def evals_per_step(self) -> int:
        return self.n_steps_each

    def step(self, denoise, process, x, state, step: Step):
        t, t_next = step.t, step.t_next
        alpha, sigma = process.alpha_sigma(t_next)
        t_last = jnp.asarray(process.t_min, jnp.result_type(t_next))
        level_last = process.sigma(t_last) / process.alpha(t_last)
        eps = self.step_lr * ((sigma / alpha) / level_last) ** 2  # in scaled units
        x = (x * (alpha / process.alpha(t))).astype(x.dtype)

        def body(j, x):
            # Langevin in y = x / alpha at step eps is, in x, a step of alpha^2 eps on grad_x log p.
            score = _score(denoise, process, x, t_next)
            z = jax.random.normal(jax.random.fold_in(step.key, j), x.shape, x.dtype)
            return (x + alpha**2 * eps * score + alpha * jnp.sqrt(2.0 * eps) * z).astype(x.dtype)

        return jax.lax.fori_loop(0, self.n_steps_each, body, x), state

    def advance(self, denoise, process, x, state, step: Step):
        """Langevin evaluates inside its loop: the final denoising step is a branch of its own."""
        return separate_final(self, denoise, process, x, state, step)
