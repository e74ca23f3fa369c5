"""iPNDM: Adams-Bashforth on the probability-flow ODE in the noise-level coordinates.

In the scaled coordinates ``y = x / alpha`` and ``rho = sigma / alpha`` the probability-flow
ODE is ``dy/drho = eps_hat(x, t)`` (Zhang & Chen 2023, "Fast sampling of diffusion models
with exponential integrator", sec. 4). iPNDM, their improved pseudo numerical method (sec. 5
and app. C; the strongest training-free few-step baseline of Zhou et al. 2024, "Fast ODE-based
sampling for diffusion models in around 5 steps"), is the explicit Adams-Bashforth method on
this ODE with the coefficients of the uniform-step formulas, at order ``min(order, i + 1)``
on step ``i`` (a lower-order warm start instead of PNDM's Runge-Kutta one):

    y_{i+1} = y_i + (rho_{i+1} - rho_i) sum_j c_j eps_{i-j},
    order 1: c = (1),  2: (3, -1) / 2,  3: (23, -16, 5) / 12,  4: (55, -59, 37, -9) / 24.

With ``variable_step=True`` the ``c_j`` are those of the variable-step Adams-Bashforth
method: ``c_j = (1 / H) int_{rho_i}^{rho_{i+1}} l_j(rho) drho`` for the Lagrange basis ``l_j``
through the nodes ``rho_i, rho_{i-1}, ...`` (exact by two-point Gauss-Legendre quadrature,
the basis being of degree at most 3), which has order ``p`` on any grid; for orders up to 3
it is DEIS's rho-AB (:class:`~difflax.solvers.deis.DEIS`). The fixed coefficients are exact
only on grids uniform in ``rho``.

The step is evaluated as ``alpha_{i+1} (x0_i + rho_{i+1} eps_i) + alpha_{i+1} H sum_{j>=1}
c_j (eps_{i-j} - eps_i)`` (the coefficients sum to 1), finite where ``alpha_i = 0`` (the flow
interpolant at ``t = 1``, ``rho_i = inf``): there only the first-order term is used, and a
node at ``rho = inf`` ends the usable history of the variable-step method. One evaluation per step.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from difflax import pytree
from difflax.checks import check_choice
from difflax.solvers.base import Solver, Step, call
from difflax.solvers.exponential import History, promote_time, select_by_order
from difflax.transitions import coefficients, eps_from_x0

__all__ = ["IPNDM"]

# Coefficients of eps_{i-j}, j >= 1, of the uniform-step Adams-Bashforth formulas (c_0 = 1 - sum).
_FIXED = {2: (-1 / 2,), 3: (-16 / 12, 5 / 12), 4: (-59 / 24, 37 / 24, -9 / 24)}
_GAUSS = (0.5 - 0.5 / math.sqrt(3.0), 0.5 + 0.5 / math.sqrt(3.0))  # two-point Gauss-Legendre on [0, 1]


def _lagrange_coefficients(rho_s, h, nodes):
    """``c_j = mean over Gauss points r of l_j(r)`` for the nodes ``(rho_s, *nodes)``, ``j >= 1``."""
    allnodes = (rho_s, *nodes)
    out = []
    for j in range(1, len(allnodes)):
        total = 0.0
        for g in _GAUSS:
            r = rho_s + g * h
            basis = 1.0
            for m, node in enumerate(allnodes):
                if m != j:
                    basis = basis * (r - node) / (allnodes[j] - node)
            total = total + 0.5 * basis
        out.append(total)
    return out


@pytree.dataclass
class IPNDM(Solver):
    """iPNDM of ``order`` in {1, 2, 3, 4} (static, default 4); ``variable_step`` (static) uses the
    variable-step Adams-Bashforth coefficients. 1 evaluation per step; the state is the
    :class:`~difflax.solvers.exponential.History` of ``eps_hat`` at ``rho`` nodes."""

    order: int = pytree.field(static=True, default=4)
    variable_step: bool = pytree.field(static=True, default=False)
    default_grid = "logsnr"

    def __post_init__(self):
        check_choice(self.order, (1, 2, 3, 4), "ipndm order")

    def init(self, process, x):
        return History.empty(max(self.order - 1, 1), x)  # after step i's push: eps_i, eps_{i-1}, ...

    def step(self, denoise, process, x, hist: History, step: Step):
        s, c = coefficients(process, promote_time(step.t, x)), coefficients(process, promote_time(step.t_next, x))
        x0 = call(denoise, x, s.t)
        eps = eps_from_x0(x, x0, s)
        rho_s, rho_t = s.sigma / s.alpha, c.sigma / c.alpha  # rho_s = inf where alpha_s = 0
        hist = hist.push(eps, rho_s)  # first: the earlier outputs are read from the pushed history
        out = c.alpha * x0 + c.sigma * eps  # first order (DDIM)
        if self.order > 1:
            order_now = hist.order(self.order)
            if self.variable_step:  # a node at rho = inf ends the usable history
                for k in range(1, self.order):
                    order_now = jnp.where(~jnp.isfinite(hist.node(k)), jnp.minimum(order_now, k), order_now)
            higher = order_now > 1
            h = jnp.where(higher, rho_t - rho_s, 0.0)
            rho = jnp.where(higher, rho_s, 0.0)  # finite (rho_s = inf only where the order is 1)
            coefs = []
            for k in range(2, self.order + 1):
                if self.variable_step:
                    # The formula of order k is evaluated at every step and selected below; where k is
                    # above the order in use its missing nodes are distinct finite stand-ins.
                    nodes = [jnp.where(order_now >= k, hist.node(m + 1), rho - (m + 1.0)) for m in range(k - 1)]
                    coefs.append(_lagrange_coefficients(rho, h, nodes))
                else:
                    coefs.append(list(_FIXED[k]))
            corr = 0.0
            for j in range(1, self.order):
                # the coefficient of (eps_{i-j} - eps_i) at each order (0 where the order has no such term)
                per_order = [0.0] + [cs[j - 1] if j - 1 < len(cs) else 0.0 for cs in coefs]
                corr = corr + select_by_order(order_now, per_order) * (hist.value(j) - eps)
            out = out + c.alpha * h * corr
        return out.astype(x.dtype), hist
