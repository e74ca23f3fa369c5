"""UniPC: unified predictor-corrector (Zhao et al. 2023, "UniPC: A unified predictor-corrector
framework for fast sampling of diffusion models", NeurIPS), data-prediction form.

With ``lambda = log(alpha / sigma)``, the step ``h = lambda_t - lambda_{s0} > 0``, ``hh = -h``,
model outputs ``m_k = x0_hat`` at earlier times ``s_k`` and ``r_k = (lambda_{s_k} - lambda_{s0}) / h``,
``D_k = (m_k - m_0) / r_k`` (Zhao et al., Algorithms 2-3, the ``B(h)`` versions):

* UniP-p (predictor): ``x_t = (sigma_t / sigma_{s0}) x_{s0} - alpha_t (e^{hh} - 1) m_0
  - alpha_t B(h) sum_{k=1}^{p-1} a_k D_k``, with ``a`` solving
  ``sum_k a_k r_k^{i-1} = i! hh phi_{i+1}(hh) / B(h)`` for ``i = 1 .. p-1``
  (``a_1 = 1/2`` for ``p = 2``, as in the paper's implementation).
* UniC-p (corrector), at the new point ``t`` with the model output ``m_t = D(x_t^pred, t)``:
  the same formula with one more node ``r_p = 1`` and ``D_p = m_t - m_0``, ``i = 1 .. p``
  (``a = 1/2`` for ``p = 1``). It raises the order of accuracy from ``p`` to ``p + 1``
  (Zhao et al., Theorem 3.1) at no extra evaluation: ``m_t`` is the model output the
  next predictor uses anyway (it stays evaluated at the *uncorrected* ``x_t^pred``).
* ``B(h) = hh`` (``variant="bh1"``) or ``B(h) = e^{hh} - 1`` (``variant="bh2"``, default).
  ``B(h)`` cancels wherever the system is square, so the variants differ only in the
  ``p = 2`` predictor and the ``p = 1`` corrector.

The schedule of diffusers' ``UniPCMultistepScheduler`` (``predict_x0=True``, default
``disable_corrector=[]``) is followed step for step. Step ``i`` at time ``t_i``:

1. evaluate ``m_i = D(x_i, t_i)`` at the predictor's output ``x_i`` (1 evaluation);
2. for ``i > 0`` correct ``x_i`` with UniC of the previous predictor's order, from the
   previous corrected sample ``x_{i-1}^c``;
3. predict ``x_{i+1}`` from ``x_i^c`` with UniP of order ``min(order, i + 1)``, and with
   ``lower_order_final`` at most ``intervals - i`` (first order on the last interval).

The corrector of the last predicted point would need one more evaluation, so it is never
applied: the sampler returns the last prediction (on a grid ending in 0, the final
denoising step ``D(x_{N-1}, t_{N-1})`` of :func:`difflax.solvers.base.run` is exactly
diffusers' last, first-order step to ``sigma = 0``, which also returns the model output
at the uncorrected ``x_{N-1}``). Consequently on a grid *without* the final step (ending at
``t_min``) UniPC-p has global order ``p + 1`` only with ``lower_order_final=False``; with
the default the last, first-order, uncorrected step limits it to order 2.

The small Vandermonde systems are solved in closed form in the reciprocal nodes
``q_k = 1 / r_k``, which are 0 for a node at ``lambda = -inf`` (the flow interpolant at
``t = 1``): that node then drops out, the limit of the formulas.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from difflax import pytree
from difflax.checks import check_choice
from difflax.solvers.base import Solver, Step, call
from difflax.solvers.exponential import History, promote_time, select_by_order, step_size, zphi
from difflax.transitions import coefficients

__all__ = ["UniPC"]


class UniPCState(NamedTuple):
    """UniPC's state: the history of ``x0_hat`` at ``lambda`` nodes, the corrected sample at the
    previous time with its ``sigma``, and the previous predictor's order (0 before the first step)."""

    history: History
    x_prev: jax.Array
    sigma_prev: jax.Array
    order_prev: jax.Array


def _g(h, n):
    """``g_i = B(h) b_i = (i+1)! hh phi_{i+2}(hh)`` for ``i < n``, ``hh = -h`` (finite for ``h = inf``)."""
    hh = -h
    return [zphi(2, hh), 2.0 * zphi(3, hh), 6.0 * zphi(4, hh)][:n]


def _b_h(h, variant):
    """``B(h)``: ``hh`` (bh1) or ``e^{hh} - 1`` (bh2)."""
    return -h if variant == "bh1" else jnp.expm1(-h)


def _half_b_h(h, variant):
    """``B(h) / 2``, the ``a = 1/2`` of the simplified orders; where ``B(h)`` is infinite (bh1, an infinite
    step) the exact ``B(h) a = hh phi_2(hh)`` (whose limit is finite) is used instead."""
    half = 0.5 * _b_h(h, variant)
    exact = zphi(2, -h)
    return jnp.where(jnp.isfinite(half), half, exact)


def _predictor_coefs(h, q, order_now, max_order, variant):
    """Coefficients ``c_k`` of ``(m_k - m_0)``, ``k = 1 .. max_order - 1``, of UniP at ``order_now``."""
    n = max_order - 1
    if n == 0:
        return []
    c1_p2 = _half_b_h(h, variant) * q[0]
    if n == 1:
        return [select_by_order(order_now, [0.0, c1_p2])]
    g0, g1 = _g(h, 2)
    q1, q2 = q[0], q[1]
    den = jnp.where(order_now >= 3, q2 - q1, 1.0)
    c1_p3 = q1 * q1 * (g1 * q2 - g0) / den
    c2_p3 = q2 * q2 * (g0 - g1 * q1) / den
    return [select_by_order(order_now, [0.0, c1_p2, c1_p3]), select_by_order(order_now, [0.0, 0.0, c2_p3])]


def _corrector_coefs(h, q, order_c, max_order, variant):
    """``([c_k for k = 1 .. max_order - 1], a_t)``: UniC coefficients of ``(m_k - m_0)`` and ``(m_t - m_0)``."""
    n = max_order - 1
    at_1 = _half_b_h(h, variant)
    if n == 0:
        return [], select_by_order(order_c, [at_1])
    g0, g1, g2 = _g(h, 3)
    q1 = q[0]
    c1_2 = q1 * q1 * (g1 - g0) / (1.0 - q1)
    at_2 = (g0 - g1 * q1) / (1.0 - q1)
    if n == 1:
        return [select_by_order(order_c, [0.0, c1_2])], select_by_order(order_c, [at_1, at_2])
    q2 = q[1]
    den = jnp.where(order_c >= 3, q2 - q1, 1.0)
    c1_3 = q1**3 * (g0 - g1 * (1.0 + q2) + g2 * q2) / (den * (1.0 - q1))
    c2_3 = -(q2**3) * (g0 - g1 * (1.0 + q1) + g2 * q1) / (den * (1.0 - q2))
    at_3 = (g0 - g1 * (q1 + q2) + g2 * q1 * q2) / ((1.0 - q1) * (1.0 - q2))
    return (
        [select_by_order(order_c, [0.0, c1_2, c1_3]), select_by_order(order_c, [0.0, 0.0, c2_3])],
        select_by_order(order_c, [at_1, at_2, at_3]),
    )


def _reciprocal_nodes(h, lam_hist, lam_s0, n, valid_from):
    """``q_k = h / (lambda_{s_k} - lambda_{s0})`` for ``k = 1 .. n`` (0 for ``lambda_{s_k} = -inf``);
    nodes ``k >= valid_from`` get the placeholder ``-k`` (finite, distinct, never selected)."""
    out = []
    for k in range(1, n + 1):
        ok = valid_from > k
        diff = jnp.where(ok, lam_hist[k - 1] - lam_s0, -1.0)
        out.append(jnp.where(ok, h / diff, -float(k)))
    return out


@pytree.dataclass
class UniPC(Solver):
    """UniPC-``order`` (UniP-p + UniC-p, Zhao et al. 2023) in data prediction, 1 evaluation per step.

    ``order`` in {1, 2, 3} (static, default 2), ``variant`` ``"bh1"`` or ``"bh2"`` (static,
    default ``"bh2"``), ``lower_order_final`` (static, default ``True`` as in diffusers).
    """

    order: int = pytree.field(static=True, default=2)
    variant: str = pytree.field(static=True, default="bh2")
    lower_order_final: bool = pytree.field(static=True, default=True)
    default_grid = "trailing"  # on diffusion and noise-level processes: logsnr (registry.DEFAULT_GRIDS)

    def __post_init__(self):
        check_choice(self.order, (1, 2, 3), "unipc order")
        check_choice(self.variant, ("bh1", "bh2"), "unipc variant")

    def init(self, process, x):
        hist = History.empty(self.order, x)  # after step i's push: m_i, m_{i-1}, ..., m_{i-order}
        return UniPCState(hist, jnp.zeros_like(x), jnp.ones((), hist.nodes.dtype), jnp.zeros((), jnp.int32))

    def step(self, denoise, process, x, state: UniPCState, step: Step):
        s, c = coefficients(process, promote_time(step.t, x)), coefficients(process, promote_time(step.t_next, x))
        m = call(denoise, x, s.t)
        hist = state.history.push(m, s.lam)  # first: the earlier outputs are read from the pushed history
        n = self.order - 1

        # ---- UniC: correct x (at s, predicted from x_prev at s0 = t_{i-1}) with m = D(x, s).
        order_c = state.order_prev
        use_c = order_c >= 1
        lam_s0 = jnp.where(use_c, hist.node(1), s.lam - 1.0)
        h_c = jnp.where(use_c, s.lam - lam_s0, 1.0)
        h_c = jnp.where(s.lam == lam_s0, 0.0, h_c)
        q_c = _reciprocal_nodes(h_c, [hist.node(k) for k in range(2, n + 2)], lam_s0, n, order_c)
        cks, a_t = _corrector_coefs(h_c, q_c, jnp.maximum(order_c, 1), self.order, self.variant)
        m0 = hist.value(1)
        k_prev = jnp.where(use_c, s.sigma / state.sigma_prev, 0.0)
        k_m0 = jnp.where(use_c, -zphi(1, -h_c), 0.0)  # 1 - e^{-h}
        corr = k_m0 * m0 - jnp.where(use_c, a_t, 0.0) * (m - m0)
        for k in range(n):
            corr = corr - jnp.where(use_c, cks[k], 0.0) * (hist.value(k + 2) - m0)
        x_c = (k_prev * state.x_prev + jnp.where(use_c, 0.0, 1.0) * x + s.alpha * corr).astype(x.dtype)

        # ---- UniP: predict x_{i+1} from x_c with m at s.
        order_p = hist.order(self.order)
        if self.lower_order_final:  # unlike DPM-Solver++, at any number of steps (as diffusers)
            order_p = jnp.minimum(order_p, step.num_steps - step.index)
        h = step_size(s, c)
        q_p = _reciprocal_nodes(h, [hist.node(k) for k in range(1, n + 1)], s.lam, n, order_p)
        cks = _predictor_coefs(h, q_p, order_p, self.order, self.variant)
        pred = -zphi(1, -h) * m
        for k in range(n):
            pred = pred - cks[k] * (hist.value(k + 1) - m)
        out = (c.sigma / s.sigma) * x_c + c.alpha * pred
        new = UniPCState(hist, x_c, s.sigma.astype(state.sigma_prev.dtype), order_p.astype(jnp.int32))
        return out.astype(x.dtype), new
