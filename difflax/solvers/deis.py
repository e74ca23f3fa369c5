"""DEIS: the rho-AB-DEIS multistep exponential integrator (Zhang & Chen 2023, "Fast sampling of
diffusion models with exponential integrator", ICLR).

In the scaled coordinates ``y = x / alpha`` and ``rho = sigma / alpha`` the probability-flow
ODE is ``dy/drho = eps_hat(x, t)`` (Zhang & Chen, sec. 4, the ``rho``-parametrization),
whose only nonlinearity is the noise prediction. rho-AB-DEIS (their eq. 17 with
``rho``) interpolates ``eps_hat`` by the Lagrange polynomial through the last ``order``
points ``rho_i, rho_{i-1}, ...`` and integrates it exactly:

``y_{i+1} = y_i + sum_j eps_{i-j} int_{rho_i}^{rho_{i+1}} l_j(rho) drho``.

With ``tau = rho - rho_i``, ``H = rho_{i+1} - rho_i`` and the distances
``a = rho_{i-1} - rho_i``, ``b = rho_{i-2} - rho_i`` the weights of the differences
``eps_{i-1} - eps_i`` and ``eps_{i-2} - eps_i`` are

* order 2: ``c_1 = H^2 / (2 a)``;
* order 3: ``c_1 = (H^3/3 - b H^2/2) / (a (a - b))``, ``c_2 = (H^3/3 - a H^2/2) / (b (b - a))``,

and ``x_{i+1} = alpha_{i+1} (x0_i + rho_{i+1} eps_i + sum_j c_j (eps_{i-j} - eps_i))``, using
``y_i + H eps_i = x0_i + rho_{i+1} eps_i``. Order 1 is DDIM. Warm-up with lower orders
(``min(order, step + 1)``); 1 evaluation per step.

The weights are computed in the reciprocal distances ``1/a``, ``1/b``, so a point at
``rho = inf`` (``alpha = 0``, the flow interpolant at ``t = 1``) gets weight 0 and drops
out of the interpolation -- the limit of the formula -- and nothing is infinite.
"""

from __future__ import annotations

import jax.numpy as jnp

from difflax import pytree
from difflax.checks import check_choice
from difflax.solvers.base import Solver, Step, call
from difflax.solvers.exponential import History, promote_time, select_by_order
from difflax.transitions import coefficients, eps_from_x0

__all__ = ["DEIS"]


@pytree.dataclass
class DEIS(Solver):
    """rho-AB-DEIS of ``order`` in {1, 2, 3} (static, default 3; order 1 is DDIM), 1 evaluation per step.

    The state is the :class:`~difflax.solvers.exponential.History` of ``eps_hat`` at ``rho`` nodes.
    """

    order: int = pytree.field(static=True, default=3)

    def __post_init__(self):
        check_choice(self.order, (1, 2, 3), "deis order")

    def init(self, process, x):
        return History.empty(max(self.order - 1, 1), x)  # after step i's push: eps_i, eps_{i-1}, eps_{i-2}

    def step(self, denoise, process, x, hist: History, step: Step):
        s, c = coefficients(process, promote_time(step.t, x)), coefficients(process, promote_time(step.t_next, x))
        x0 = call(denoise, x, s.t)
        eps = eps_from_x0(x, x0, s)
        rho_s = s.sigma / s.alpha  # inf for alpha_s = 0
        hist = hist.push(eps, rho_s)  # first: the earlier outputs are read from the pushed history
        rho_t = c.sigma / c.alpha
        out = c.alpha * x0 + c.sigma * eps  # DDIM: alpha_t (x0 + rho_t eps)
        if self.order >= 2:
            order_now = hist.order(self.order)
            use2 = order_now >= 2
            h = jnp.where(use2, rho_t - rho_s, 0.0)  # H
            ia = jnp.where(use2, 1.0 / jnp.where(use2, hist.node(1) - rho_s, 1.0), 0.0)  # 1 / a
            c1_2 = 0.5 * h * h * ia
            coefs = [select_by_order(order_now, [0.0, c1_2])]
            if self.order == 3:
                use3 = order_now >= 3
                ib = jnp.where(use3, 1.0 / jnp.where(use3, hist.node(2) - rho_s, 1.0), 0.0)  # 1 / b
                den = jnp.where(use3, ib - ia, 1.0)
                c1 = ia * ia * (h**3 * ib / 3.0 - h * h / 2.0) / den
                c2 = -ib * ib * (h**3 * ia / 3.0 - h * h / 2.0) / den
                coefs = [
                    select_by_order(order_now, [0.0, c1_2, c1]),
                    select_by_order(order_now, [0.0, 0.0, c2]),
                ]
            corr = sum(coef * (hist.value(j) - eps) for j, coef in enumerate(coefs, start=1))
            out = out + c.alpha * corr
        return out.astype(x.dtype), hist
