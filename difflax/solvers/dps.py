r"""Diffusion posterior sampling (Chung et al. 2023, "Diffusion posterior sampling for general
noisy inverse problems", alg. 1) for ``y = A(x0) + noise``, as a solver wrapper.

Each step evaluates ``x0_hat = D(x_i, t_i)`` and, by reverse mode through the denoiser,
``grad_{x_i} ||y - A(x0_hat)||^2``; takes the wrapped solver's step from ``x0_hat`` to
``x'_{i-1}``; and corrects it,

    x_{i-1} = x'_{i-1} - zeta_i grad_{x_i} ||y - A(x0_hat(x_i))||^2,
    zeta_i = zeta / ||y - A(x0_hat(x_i))||          (per example; the paper's step size),

ending with the denoising step ``D(x, t_min)`` (no correction). ``A`` is any differentiable function (or a
:class:`difflax.guidance.LinearOperator`); it need not be linear. The wrapped solver must
evaluate the denoiser once per step at the current point (DDPM, the paper's, DDIM or Euler):
its evaluation and the gradient share one forward pass. DPS is an approximation
(``p(y | x_t) ~ p(y | x0_hat)``) with a tuned ``zeta`` (the paper: 0.1 to 1 for images),
which may be traced.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from difflax import pytree
from difflax.guidance.inverse import as_operator
from difflax.processes import broadcast_to
from difflax.solvers.ancestral import DDIM, DDPM
from difflax.solvers.base import Solver, Step, Wrapper, call, run
from difflax.solvers.ode import Euler
from difflax.solvers.registry import resolve_grid, resolve_solver

__all__ = ["DPS", "dps_sample"]

# Solvers that evaluate the denoiser exactly once per step, at the current (x, t).
SINGLE_CALL_SOLVERS = (DDPM, DDIM, Euler)


@pytree.dataclass
class DPS(Wrapper):
    """Wrap a single-evaluation solver ``inner`` with the DPS correction toward ``measurement = A(x0)``.

    ``operator`` is the function ``x0 -> A(x0)`` (static); ``zeta`` the step scale (traced).
    """

    inner: Solver
    measurement: jax.Array
    zeta: float = 1.0
    operator: Callable = pytree.field(static=True, default=None)

    def __post_init__(self):
        if not isinstance(self.inner, SINGLE_CALL_SOLVERS):
            names = ", ".join(cls.__name__ for cls in SINGLE_CALL_SOLVERS)
            raise ValueError(f"DPS needs a solver with one denoiser call per step ({names}); "
                             f"got {type(self.inner).__name__}.")
        if not callable(self.operator):
            raise TypeError(f"operator must be a function x0 -> A(x0); got {type(self.operator).__name__}.")

    def step(self, denoise, process, x, state, step: Step):
        def sq_residual(z):
            x0 = call(denoise, z, step.t)
            r = self.measurement - self.operator(x0)
            return jnp.sum(r**2), (x0, r)

        (_, (x0, r)), grad = jax.value_and_grad(sq_residual, has_aux=True)(x)
        norm = jnp.sqrt(jnp.sum(r**2, axis=tuple(range(1, r.ndim))))
        step_size = broadcast_to(self.zeta / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny), grad)
        x, state = self.inner.advance(lambda *_: x0, process, x, state, step)
        return jnp.where(step.final, x, x - step_size * grad), state

    def advance(self, denoise, process, x, state, step: Step):
        """:meth:`step`: its evaluation ``x0_hat`` is also the final denoising step's (uncorrected)."""
        return self.step(denoise, process, x, state, step)


def dps_sample(
    denoise,
    process,
    x_T: jax.Array,
    measurement: jax.Array,
    operator,
    key: jax.Array | None = None,
    *,
    zeta=1.0,
    solver="ddpm",
    steps: int = 100,
    grid=None,
    return_trajectory: bool = False,
    **solver_args,
):
    """Sample ``p(x0 | y)`` approximately with :class:`DPS` around ``solver``; as :func:`difflax.sample`."""
    inner = resolve_solver(solver, solver_args)
    wrapped = DPS(inner, jnp.asarray(measurement), zeta, as_operator(operator).forward)
    ts, final_zero = resolve_grid(grid, wrapped, process, steps)
    return run(wrapped, denoise, process, jnp.asarray(x_T), ts, final_zero=final_zero, key=key,
               return_trajectory=return_trajectory)
