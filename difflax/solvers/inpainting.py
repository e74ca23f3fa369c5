r"""Inpainting by replacement and RePaint resampling, as a solver wrapper.

After every step of the wrapped solver from ``t`` to ``t_next`` the known region is
overwritten with a fresh draw of the forward marginal, ``x_{t_next}[m] = alpha(t_next)
known[m] + sigma(t_next) z`` (Song et al. 2021, "Score-based generative modeling through
stochastic differential equations", app. I.2), and the final denoising step returns exactly
``known`` on the mask. Unlike the denoiser transform :func:`difflax.guidance.inpaint`, this
needs ``x`` between steps, so it wraps a solver (:class:`ReplaceKnown`) the way an optax
wrapper wraps a transformation; :func:`difflax.solvers.base.run` drives it.

RePaint (Lugmayr et al. 2022, "RePaint: inpainting using denoising diffusion probabilistic
models", the schedule of their ``get_schedule_jump``): every ``jump_length = j`` steps the
sampler goes back ``j`` steps by re-noising the whole sample with the forward transition
``q(x_{t+j} | x_t)`` and redoes them, ``resample - 1 = r - 1`` times, which lets the
unknown region harmonize with the known one (the paper uses ``j = 10``, ``r = 10``).
:func:`repaint_moves` gives this walk over the grid; the loop re-noises on the way up and
restarts the solver's state after each jump. It costs about ``r`` times the evaluations.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from difflax import pytree
from difflax.checks import check_positive_int
from difflax.guidance.constraints import prepare_mask
from difflax.solvers.base import Solver, Step, Wrapper, run
from difflax.solvers.registry import resolve_grid, resolve_solver

__all__ = ["ReplaceKnown", "inpaint_sample", "repaint_moves"]


@pytree.dataclass
class ReplaceKnown(Wrapper):
    """Wrap ``inner`` so that after each step the known region is a fresh draw of ``q(x_t | known)``.

    ``mask`` (true where known) and ``known`` have the shape of the sample.
    """

    inner: Solver
    known: jax.Array
    mask: jax.Array
    stochastic = True

    def step(self, denoise, process, x, state, step: Step):
        return self._replace_known(self.inner.step, denoise, process, x, state, step)

    def advance(self, denoise, process, x, state, step: Step):
        """The inner solver's move, then the replacement; on the final step ``known`` itself."""
        return self._replace_known(self.inner.advance, denoise, process, x, state, step)

    def _replace_known(self, move, denoise, process, x, state, step: Step):
        inner_key, known_key = jax.random.split(step.key)
        if step.final is not False:  # the final step's inner key is the step's own
            inner_key = jnp.where(step.final, step.key, inner_key)
        x, state = move(denoise, process, x, state, step._replace(key=inner_key))
        alpha, sigma = process.alpha_sigma(step.t_next)
        noisy_known = alpha * self.known + sigma * jax.random.normal(known_key, x.shape, x.dtype)
        known = jnp.where(step.final, self.known, noisy_known).astype(x.dtype)
        return jnp.where(self.mask, known, x), state


def repaint_moves(num_steps: int, jump_length: int, resample: int) -> list[tuple[int, int]]:
    """RePaint's walk over ``num_steps + 1`` grid positions (``0`` the noisiest) as ``(from, to)`` moves.

    Every ``jump_length`` steps (counted from the clean end) the walk jumps back
    ``jump_length`` positions, ``resample - 1`` times, so each such segment is sampled
    ``resample`` times; ``to < from`` is a jump.
    """
    jumps = {lvl: resample - 1 for lvl in range(0, num_steps - jump_length, jump_length)}
    lvl = num_steps
    path = [lvl]
    while lvl >= 1:
        lvl -= 1
        path.append(lvl)
        if jumps.get(lvl, 0) > 0:
            jumps[lvl] -= 1
            lvl += jump_length
            path.append(lvl)
    return list(itertools.pairwise(num_steps - level for level in path))


def inpaint_sample(
    denoise,
    process,
    x_T: jax.Array,
    known: jax.Array,
    mask: jax.Array,
    key: jax.Array,
    *,
    solver="ddpm",
    steps: int = 50,
    grid=None,
    jump_length: int = 1,
    resample: int = 1,
    return_trajectory: bool = False,
    **solver_args,
):
    """Inpaint with :class:`ReplaceKnown` around ``solver``, with RePaint resampling when ``resample > 1``.

    Args:
      denoise, process, x_T: as in :func:`difflax.sample`.
      known: the known values; ``mask``: true (or 1) where known; both broadcast to ``x_T``.
      key: PRNG key (replacement noise, jumps and the solver's own noise).
      solver, steps, grid, **solver_args: as in :func:`difflax.sample` (grid default: the solver's).
      jump_length, resample: RePaint's ``j`` and ``r`` (static ints; ``resample = 1``: plain replacement).
      return_trajectory: also return ``info["trajectory"]`` (the sample after every move,
        starting with ``x_T`` and ending with the output) and ``info["trajectory_t"]``
        (their times; the final denoising step has time 0).

    Returns ``(x0, info)`` with ``info["nfe"]`` and, with jumps, ``info["moves"]``.
    """
    check_positive_int(jump_length, "jump_length")
    check_positive_int(resample, "resample")
    x_T = jnp.asarray(x_T)
    m = prepare_mask(mask, x_T.shape, known=known)
    known = jnp.broadcast_to(jnp.asarray(known, x_T.dtype), x_T.shape)
    inner = resolve_solver(solver, solver_args)
    ts, final_zero = resolve_grid(grid, inner, process, steps)
    positive = ts[:-1] if final_zero else ts
    moves = repaint_moves(positive.shape[0] - 1, jump_length, resample)
    wrapped = ReplaceKnown(inner, known, m)
    x, info = run(wrapped, denoise, process, x_T, ts, final_zero=final_zero, key=key,
                  return_trajectory=return_trajectory, moves=moves)
    info["moves"] = np.asarray(moves, np.int32).reshape(-1, 2)
    if return_trajectory:
        times = positive[info["moves"][:, 1]]
        end = jnp.zeros((1,), positive.dtype) if final_zero else times[-1:]
        info["trajectory_t"] = jnp.concatenate([positive[:1], times, end])
    return x, info
