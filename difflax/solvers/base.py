"""The solver protocol and the one loop that drives every solver.

A solver is an immutable pytree (:func:`difflax.pytree.dataclass`) deriving from
:class:`Solver`: static fields (order, variant) decide the program, array fields (``eta``,
``s_churn``, ...) are traced, so sweeping them under ``jit`` never recompiles. It declares

* ``evals_per_step`` -- denoiser evaluations per step (static);
* ``default_grid`` -- the solver's preferred grid, which :func:`difflax.sample` uses when none
  is given, adapted to the process's kind of time (:func:`difflax.solvers.registry.default_grid`);
* ``stochastic`` -- whether a step draws noise (then :func:`run` needs a key);

and two pure functions,

* ``init(process, x_T) -> state`` -- its own typed state (multistep history), ``()`` if none;
* ``step(denoise, process, x, state, step: Step) -> (x, state)`` -- one step from ``step.t``
  to ``step.t_next``;

and inherits ``advance``, what the loop calls: ``step``, or the final denoising step.

A solver whose step evaluates the denoiser more than once may be ``staged``: it then also
implements ``stage(denoise, process, x, state, step)``, the part of the step around one
evaluation (``step.stage``, traced, counts them from 0), and the loop runs one stage per
iteration, ``evals_per_step`` iterations a step. Every iteration then evaluates the network
once, with no branch: the final denoising step is the first stage's own evaluation, and the
program holds one copy of the network where an unstaged two-evaluation solver holds two.

The solver computes; :func:`run` counts. It scans over the grid, hands each step its
interval, its grid position, and its own PRNG key ``fold_in(key, move)``, and returns
``info["nfe"] = evals_per_step * steps`` plus one for the final denoising step
``x0 = D(x, t_min)`` when the grid ends in an exact zero. That step is the scan's last
iteration (``Step.final``), so the compiled program holds the network once per place a step
evaluates it, not once more for the final step: :meth:`Solver.advance` makes it the step's
own first evaluation (Karras et al. 2022, algorithm 1: the last step to ``sigma = 0`` is the
denoiser's output). A grid may also move *up* in time (RePaint's jumps,
:func:`difflax.solvers.inpainting.repaint_moves`): such a move re-noises the sample with the
forward transition ``q(x_{t_next} | x_t)`` and restarts the solver's state, at no evaluation.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from difflax.checks import check_floating
from difflax.transitions import coefficients, forward_std

Array = jax.Array

__all__ = [
    "Solver", "Step", "Wrapper", "call", "first_stage_picks", "run", "separate_final", "staged_step", "time_vector",
]


class Step(NamedTuple):
    """What the loop hands a solver for one step.

    Attributes:
      t: the current (noisier) time, a scalar.
      t_next: the time to step to.
      index: the grid position of ``t`` (int32 scalar; ``0`` at ``t_max``).
      num_steps: intervals of the whole grid, the final denoising step included (an int,
        or an int32 scalar where one program serves several step counts).
      key: this step's PRNG key, or ``None`` when the sampler runs without one.
      final: whether this is the final denoising step (a bool scalar, traced in the loop; ``False``
        where the loop has none). On the final step ``t_next`` is ``t``: the step's own result is
        replaced by ``x0 = D(x, t)`` (:meth:`Solver.advance`), and a zero-length step keeps the
        discarded branch finite, so no NaN reaches a gradient through ``jnp.where``.
      stage: for a ``staged`` solver run by the loop, which of the step's evaluations this
        iteration makes (int32 scalar, ``0 .. evals_per_step - 1``); ``None``: the whole step.
    """

    t: Array
    t_next: Array
    index: Array
    num_steps: int
    key: Array | None
    final: Array | bool = False
    stage: Array | int | None = None


class Solver(abc.ABC):
    """Base class of every solver: ``step`` to implement, defaults for the rest (see the module docstring)."""

    evals_per_step: int = 1
    default_grid: str = "logsnr"
    stochastic: bool = False
    staged: bool = False  # True: the solver also defines stage() (module docstring)

    def init(self, process, x: Array) -> Any:
        """The solver's state at the start (and after a jump up in time): none by default."""
        return ()

    @abc.abstractmethod
    def step(self, denoise: Callable, process, x: Array, state, step: Step) -> tuple[Array, Any]:
        """One step from ``step.t`` to ``step.t_next``: ``(x_next, state_next)``."""

    def advance(self, denoise: Callable, process, x: Array, state, step: Step) -> tuple[Array, Any]:
        """What the loop calls: :meth:`step` (a staged solver's ``stage``), or on the final step
        (``step.final``) ``x0 = D(x, step.t)``.

        The final denoising step is the step's own first evaluation, ``D(x, t)`` (the limit of every
        solver's step to ``sigma = 0``), so no other copy of the network is needed; the step's later
        evaluations are skipped there (``lax.cond``; a staged solver has none) and its result is
        dropped. A solver whose first evaluation is elsewhere, or inside a nested loop or transform,
        overrides this method (e.g. with :func:`separate_final`).
        """
        move = self.stage if self.staged and step.stage is not None else self.step
        if step.final is False:
            return move(denoise, process, x, state, step)
        first = []

        def evaluate(x_in, t_in):
            if not first:
                first.append(denoise(x_in, t_in))
                return first[0]
            out = jax.eval_shape(denoise, x_in, t_in)
            return jax.lax.cond(step.final, lambda: jnp.zeros(out.shape, out.dtype), lambda: denoise(x_in, t_in))

        x_next, state = move(evaluate, process, x, state, step)
        if not first:
            raise ValueError(f"{type(self).__name__}.step evaluates no denoiser; it needs its own advance().")
        return jnp.where(step.final, first[0].astype(x.dtype), x_next), state


class Wrapper(Solver):
    """Base of solver -> solver wrappers: everything is the wrapped solver's (``self.inner``) unless overridden.

    A wrapper acts between the steps of ``inner`` (as optax's ``apply_if_finite`` wraps a
    transformation) and is run by the same :func:`run`.
    """

    inner: Solver

    @property
    def evals_per_step(self) -> int:
        return self.inner.evals_per_step

    @property
    def default_grid(self) -> str:
        return self.inner.default_grid

    @property
    def stochastic(self) -> bool:
        return self.inner.stochastic

    def init(self, process, x):
        return self.inner.init(process, x)


def time_vector(t, x):
    """The denoiser's ``t`` argument: the scalar time broadcast to the batch, ``(batch,)``."""
    return jnp.full((x.shape[0],), t, dtype=x.dtype)


def call(denoise: Callable, x: Array, t) -> Array:
    """Evaluate the denoiser at a scalar time, checking the contract's shape."""
    out = denoise(x, time_vector(t, x))
    if out.shape != x.shape:
        raise ValueError(f"denoise must return an array of the shape of x {x.shape}; got {out.shape}.")
    return out


def staged_step(solver: Solver, denoise: Callable, process, x: Array, state, step: Step) -> tuple[Array, Any]:
    """A staged solver's whole step (its ``step``): its stages ``0 .. evals_per_step - 1`` in turn."""
    for stage in range(solver.evals_per_step):
        x, state = solver.stage(denoise, process, x, state, step._replace(stage=stage))
    return x, state


def first_stage_picks(step: Step) -> Callable:
    """``pick(a, b)``: ``a`` on a step's first stage, ``b`` on the others; a select where the stage is
    traced (the loop), the value itself where it is an int (:func:`staged_step`)."""
    if isinstance(step.stage, int):
        return (lambda a, b: a) if step.stage == 0 else (lambda a, b: b)
    return functools.partial(jnp.where, step.stage == 0)


def separate_final(solver: Solver, denoise: Callable, process, x: Array, state, step: Step) -> tuple[Array, Any]:
    """:meth:`Solver.advance` for a solver whose steps evaluate inside their own loops: the final
    denoising step ``D(x, step.t)`` as a separate branch (``lax.cond``), one more copy of the network."""
    if step.final is False:
        return solver.step(denoise, process, x, state, step)

    def final(x, state):
        return call(denoise, x, step.t).astype(x.dtype), state

    def move(x, state):
        return solver.step(denoise, process, x, state, step)

    return jax.lax.cond(step.final, final, move, x, state)


def _renoise(process, x, t, t_next, key):
    """A draw of the forward transition ``q(x_{t_next} | x_t)``, ``t_next > t``."""
    up, down = coefficients(process, t_next), coefficients(process, t)
    return (up.alpha / down.alpha) * x + forward_std(up, down) * jax.random.normal(key, x.shape, x.dtype)


def run(
    solver: Solver,
    denoise: Callable,
    process,
    x_T: Array,
    ts: Array,
    *,
    final_zero: bool,
    key: Array | None = None,
    return_trajectory: bool = False,
    moves=None,
):
    """Integrate from ``ts[0]`` along the grid ``ts`` with ``solver``; see :func:`difflax.sample`.

    ``moves`` (static, default ``(i, i + 1)`` for every interval) is a sequence of
    ``(from, to)`` positions in the grid's positive times; a move with ``to < from`` goes up
    in time (see the module docstring). Returns ``(x, info)``.
    """
    check_floating(x_T, "x_T")
    positive = ts[:-1] if final_zero else ts
    num_steps = ts.shape[0] - 1
    if moves is None:
        moves = np.stack([np.arange(positive.shape[0] - 1), np.arange(1, positive.shape[0])], axis=1)
    moves = np.asarray(moves, np.int32).reshape(-1, 2)
    ups = moves[:, 1] < moves[:, 0]
    if solver.stochastic or ups.any():
        if key is None:
            what = "is stochastic with these settings" if solver.stochastic else "jumps up in time"
            raise ValueError(f"the sampler {what}; pass key=jax.random.key(...).")
    last = positive.shape[0] - 1
    # The final denoising step is the last move, from the last positive time to ts[-1] = 0 (see Step.final).
    scan_moves = np.concatenate([moves, [[last, last + 1]]]) if final_zero else moves
    # One row per iteration: (move number, from, to, stage); a staged solver's step takes evals_per_step
    # iterations (a jump and the final step one), the others' one.
    rows = []
    for n, (i, j) in enumerate(scan_moves):
        stages = solver.evals_per_step if solver.staged and i < j and not (final_zero and j > last) else 1
        rows += [(n, i, j, s) for s in range(stages)]
    rows = np.asarray(rows, np.int32)
    step_ends = np.flatnonzero(np.append(rows[1:, 0] != rows[:-1, 0], True))  # an iteration ending a move

    def down(x, state, i, j, k, stage):
        final = (j > last) if final_zero else False
        step = Step(ts[i], ts[jnp.where(final, i, j)], i, num_steps, k, final, stage if solver.staged else None)
        return solver.advance(denoise, process, x, state, step)

    def up(x, state, i, j, k, stage):
        x = _renoise(process, x, ts[i], ts[j], k)
        return x, solver.init(process, x)

    def body(carry, row):
        x, state = carry
        n, i, j, stage = row[0], row[1], row[2], row[3]
        k = None if key is None else jax.random.fold_in(key, n)
        if ups.any():
            x, state = jax.lax.cond(j > i, down, up, x, state, i, j, k, stage)
        else:
            x, state = down(x, state, i, j, k, stage)
        return (x, state), (x if return_trajectory else None)

    (x, _), traj = jax.lax.scan(body, (x_T, solver.init(process, x_T)), jnp.asarray(rows))
    if return_trajectory and len(step_ends) < len(rows):
        traj = traj[step_ends]
    nfe = solver.evals_per_step * int((~ups).sum()) + int(final_zero)
    info = {"nfe": jnp.asarray(nfe, jnp.int32), "steps": num_steps, "ts": ts}
    if return_trajectory:
        info["trajectory"] = jnp.concatenate([x_T[None], traj])
    if ups.any():
        info["moves"] = moves
    return x, info
