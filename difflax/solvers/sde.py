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
    the norms concentrate) but measurable in low dimension (about +9% on the
    within-mode variance of a 64-D mixture, against +3% with ``norm="batch"``), and in
    a handful of dimensions ``||score||`` is sometimes near zero and the step explodes
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
from flax import struct

from difflax.solvers.base import SolverState, call, coefficients, exp_neg_h, init_state

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
    norm = jnp.sqrt(jnp.sum(v**2, axis=tuple(range(1, v.ndim)), keepdims=True))
    return norm


def _em_step(denoise, process, state: SolverState, t, t_next) -> SolverState:
    x = state.x
    score = _score(denoise, process, x, t)
    f, g = process.sde_coefficients(t)
    dt = t_next - t  # negative
    state, sub = state.next_key()
    z = jax.random.normal(sub, x.shape, x.dtype)
    x = x + (f * x - g**2 * score) * dt + g * jnp.sqrt(-dt) * z
    return state.replace(x=x, nfe=state.nfe + 1)


@struct.dataclass
class EulerMaruyama:
    """Euler-Maruyama on the reverse-time SDE (Song et al. 2021): 1 NFE per step."""

    stochastic = True

    def init(self, process, x, key, num_steps):
        return init_state(x, key)

    def step(self, denoise, process, state: SolverState, t, t_next) -> SolverState:
        state = _em_step(denoise, process, state, t, t_next)
        return state.replace(step=state.step + 1)


@struct.dataclass
class PC:
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
    predictor: str = struct.field(pytree_node=False, default="reverse_diffusion")
    corrector_steps: int = struct.field(pytree_node=False, default=1)
    norm: str = struct.field(pytree_node=False, default="batch")
    stochastic = True

    def __post_init__(self):
        if self.predictor not in _PREDICTORS:
            raise ValueError(f"predictor must be one of {', '.join(map(repr, _PREDICTORS))}; got {self.predictor!r}.")
        if not isinstance(self.corrector_steps, int) or self.corrector_steps < 0:
            raise ValueError(f"corrector_steps must be a non-negative int; got {self.corrector_steps!r}.")
        if self.norm not in ("example", "batch"):
            raise ValueError(f"norm must be 'example' or 'batch'; got {self.norm!r}.")

    def init(self, process, x, key, num_steps):
        return init_state(x, key)

    def _corrector(self, denoise, process, state: SolverState, t, t_next) -> SolverState:
        a = (process.alpha(t) / process.alpha(t_next)) ** 2  # alpha_i = 1 - beta_i of score_sde

        def body(_, state):
            score = _score(denoise, process, state.x, t)
            state, sub = state.next_key()
            z = jax.random.normal(sub, state.x.shape, state.x.dtype)
            grad_norm, noise_norm = _per_example_norm(score), _per_example_norm(z)
            if self.norm == "batch":
                grad_norm, noise_norm = jnp.mean(grad_norm), jnp.mean(noise_norm)
            grad_norm = jnp.maximum(grad_norm, jnp.finfo(score.dtype).tiny)
            step = 2.0 * a * (self.snr * noise_norm / grad_norm) ** 2
            x = state.x + step * score + jnp.sqrt(2.0 * step) * z
            return state.replace(x=x, nfe=state.nfe + 1)

        return jax.lax.fori_loop(0, self.corrector_steps, body, state)

    def _reverse_diffusion(self, denoise, process, state: SolverState, t, t_next) -> SolverState:
        s, c = coefficients(process, t), coefficients(process, t_next)
        x = state.x
        score = _score(denoise, process, x, t)
        a = s.alpha / c.alpha
        # b^2 = sigma_t^2 - a^2 sigma_next^2 = sigma_t^2 (1 - e^{-2h}), written without cancellation.
        b2 = s.sigma**2 * -jnp.expm1(2.0 * jnp.log(exp_neg_h(s, c)))
        state, sub = state.next_key()
        z = jax.random.normal(sub, x.shape, x.dtype)
        x = x - (a - 1.0) * x + b2 * score + jnp.sqrt(b2) * z
        return state.replace(x=x, nfe=state.nfe + 1)

    def step(self, denoise, process, state: SolverState, t, t_next) -> SolverState:
        if self.corrector_steps:
            state = self._corrector(denoise, process, state, t, t_next)
        if self.predictor == "reverse_diffusion":
            state = self._reverse_diffusion(denoise, process, state, t, t_next)
        elif self.predictor == "euler_maruyama":
            state = _em_step(denoise, process, state, t, t_next)
        return state.replace(step=state.step + 1)


@struct.dataclass
class ALD:
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
    n_steps_each: int = struct.field(pytree_node=False, default=5)
    stochastic = True

    def __post_init__(self):
        if not isinstance(self.n_steps_each, int) or self.n_steps_each < 1:
            raise ValueError(f"n_steps_each must be a positive int; got {self.n_steps_each!r}.")

    def init(self, process, x, key, num_steps):
        return init_state(x, key)

    def step(self, denoise, process, state: SolverState, t, t_next) -> SolverState:
        alpha, sigma = process.alpha_sigma(t_next)
        t_last = jnp.asarray(process.t_min, jnp.result_type(t_next))
        level_last = process.sigma(t_last) / process.alpha(t_last)
        eps = self.step_lr * ((sigma / alpha) / level_last) ** 2  # in scaled units
        state = state.replace(x=state.x * (alpha / process.alpha(t)))

        def body(_, state):
            # Langevin in y = x / alpha at step eps is, in x, a step of alpha^2 eps on grad_x log p.
            score = _score(denoise, process, state.x, t_next)
            state, sub = state.next_key()
            z = jax.random.normal(sub, state.x.shape, state.x.dtype)
            x = state.x + alpha**2 * eps * score + alpha * jnp.sqrt(2.0 * eps) * z
            return state.replace(x=x, nfe=state.nfe + 1)

        state = jax.lax.fori_loop(0, self.n_steps_each, body, state)
        return state.replace(step=state.step + 1)
