"""Speculative sampling of the Gaussian ancestral sampler (De Bortoli et al. 2025).

"Accelerated diffusion models via speculative sampling" (De Bortoli, Galashov, Gretton
and Doucet, ICML 2025) carries speculative decoding over to the Gaussian Markov chain of
a diffusion sampler. The *target* chain is the ancestral sampler of
:mod:`difflax.solvers.ancestral` (DDPM with ``beta~``, i.e. DDIM with ``eta = 1``) on a
time grid ``t_0 > t_1 > ... > t_N``: from ``x`` at ``s = t_n`` to ``t = t_{n+1}``

    p_n(. | x) = N(m_p, std^2 I),  m_p = alpha_t x0 + sigma_t e^{-h} eps_s,  std^2 = sigma_t^2 (1 - e^{-2h}),

with ``x0 = D_target(x, s)``, ``eps_s = (x - alpha_s x0) / sigma_s`` and
``h = lambda_t - lambda_s``. A *draft* transition ``q_n`` has the same form with another
``x0`` (a cheaper denoiser's, or a frozen one), hence the same variance. One round, per
example, from the current state ``y_0 = x`` at grid index ``n``:

1. Draft ``K`` transitions sequentially (cheap): ``y_{i+1} = m_q(y_i) + std z_i``,
   ``z_i ~ N(0, I)``.
2. Evaluate the target on ``y_0, ..., y_K`` in ONE batched call (the target ``vmap``-ed over
   the ``K + 1`` states, each of the batch's shape with a time vector per example, so a
   condition the target closes over applies to every state).
3. Verify ``i = 0, 1, ...`` in order: accept ``y_{i+1}`` with probability
   ``min(1, p_i(y_{i+1}) / q_i(y_{i+1}))``. Both are Gaussians with covariance
   ``std^2 I``, so with ``delta = (m_p - m_q) / std``

       log p_i(y_{i+1}) - log q_i(y_{i+1}) = <z_i, delta> - |delta|^2 / 2.

4. At the first rejection, replace ``y_{i+1}`` by the reflection of the draft's noise in
   the hyperplane orthogonal to ``e = delta / |delta|`` (the reflection maximal coupling,
   Lindvall & Rogers 1986; the paper's adjusted rejection step):

       y' = m_p + std (I - 2 e e^T) z_i,

   and end the round. If all ``K`` proposals are accepted the target's output at ``y_K``
   is already there: one more target transition from ``y_K`` (fresh noise) is free, so a
   round advances between 1 and ``K + 1`` grid steps.

**Why the output is exact.** Write ``u = <e, z>`` (the coordinate along ``e``; the
orthogonal part of ``z`` is shared by the proposal, the target and the reflection, so
everything happens in this one coordinate) and ``d = |delta|``. Under ``q`` the
coordinate of the proposal is ``u ~ N(0, 1)``; under ``p`` it is ``N(d, 1)``. The
accepted part of the output has density ``phi(v) min(1, phi(v - d) / phi(v)) =
min(phi(v), phi(v - d))`` at ``v``; a rejected ``u`` is sent to ``v = d - u``, whose density
is ``phi(d - v) (1 - min(1, phi(-v) / phi(d - v))) = phi(v - d) - min(phi(v), phi(v - d))``.
The sum is ``phi(v - d)``: the output is exactly ``p_i(. | y_i)``. The proposal is kept
with probability ``int min(phi(v), phi(v - d)) dv = 2 Phi(-d / 2) = 1 - TV(p_i, q_i)``, the
largest possible (the coupling is maximal), and a reflected output never equals the
proposal. Each accepted state is an exact ``p``-transition of its predecessor, the
replacement is one too, and the next round starts afresh from it (all later proposals are
discarded), so the chain of states is the target's ancestral chain and the final sample
has exactly the distribution of :func:`difflax.sample` with ``solver="ddpm"`` on the same
grid. In ``lambda`` form, ``|delta| = e^{lambda_t} sqrt(1 - e^{-2h}) |x0_draft - x0_target|``:
drafts may be poor at high noise and must be good at low noise.

**Drafts.** ``draft`` is any denoiser (a distilled student, a small network, the exact
denoiser of a simpler model) or ``"frozen"``: the target's own ``x0`` prediction at the
state before the current one (the last verified step) is held fixed for all ``K``
proposals of the round (no draft evaluations at all; before the first round it is zero).
Any draft keeps the output exact; a good one only makes rounds longer.

**Batches.** Examples accept different lengths, so each example carries its own grid
index ``n``: draft and target are called with a per-example time vector, examples that
have finished are carried along (masked) until the whole batch is done, proposals past
the end of the grid are masked, and the loop is one ``lax.while_loop`` over rounds. With
a grid ending in an exact 0 the final denoising step ``x0 = D_target(x_N, t_min)`` is the
target's output at the state ``x_N`` (read from the round's batched call when ``x_N`` is an
accepted proposal, or computed by one more round when it is a replacement).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from difflax.checks import check_batched, check_positive_int
from difflax.processes import broadcast_to
from difflax.solvers.ancestral import DDPM
from difflax.solvers.registry import resolve_grid
from difflax.transitions import coefficients, exp_neg_h, posterior_std

Array = jax.Array

__all__ = ["reflection_coupling", "speculative_sample"]


def _dot(a, b, batch_ndim):
    """Inner product over the event axes (everything after the first ``batch_ndim`` axes)."""
    return jnp.sum(a * b, axis=tuple(range(batch_ndim, a.ndim)))


def reflection_coupling(z: Array, u: Array, mean_q: Array, mean_p: Array, std) -> tuple[Array, Array, Array]:
    """Reflection maximal coupling of ``q = N(mean_q, std^2 I)`` and ``p = N(mean_p, std^2 I)``.

    With ``delta = (mean_p - mean_q) / std`` and ``e = delta / |delta|``:

    * ``x = mean_q + std z`` (a draw of ``q``);
    * ``y = x`` if ``log u <= <z, delta> - |delta|^2 / 2`` (i.e. ``u <= p(x) / q(x)``), else
      ``y = mean_p + std (z - 2 <e, z> e)``.

    For ``z ~ N(0, I)`` and ``u ~ U[0, 1)`` independent, ``y ~ p`` exactly and
    ``P(x == y) = 2 Phi(-|delta| / 2) = 1 - TV(p, q)`` (proof in the module docstring).

    Args:
      z: standard normal draws, shape ``(*batch, *event)``.
      u: uniform draws, shape ``batch`` (one or more batch axes).
      mean_q, mean_p: means, shape ``(*batch, *event)``.
      std: common standard deviation, a scalar or of shape ``batch``.

    Returns:
      ``(x, y, coupled)``: the draw of ``q``, the draw of ``p`` and ``x == y`` as a bool of shape ``batch``.
    """
    u = jnp.asarray(u)
    nb = u.ndim  # batch axes
    std = broadcast_to(std, mean_q)
    delta = (mean_p - mean_q) / std
    log_ratio = _dot(z, delta, nb) - 0.5 * _dot(delta, delta, nb)
    coupled = jnp.log(u) <= log_ratio
    norm = jnp.sqrt(_dot(delta, delta, nb))
    e = delta / broadcast_to(jnp.where(norm > 0, norm, 1.0), delta)
    reflected = z - 2.0 * broadcast_to(_dot(e, z, nb), z) * e
    x = mean_q + std * z
    y = jnp.where(broadcast_to(coupled, x), x, mean_p + std * reflected)
    return x, y, coupled


def _step_table(process, pos, dtype):
    """Per-step coefficients ``(alpha_s, alpha_t, sigma_t e^{-h} / sigma_s, std)``, shape ``(4, N)``.

    Step ``a`` is the ancestral step ``pos[a] -> pos[a + 1]``.
    """
    s, t = coefficients(process, pos[:-1]), coefficients(process, pos[1:])
    return jnp.stack([s.alpha, t.alpha, t.sigma * exp_neg_h(s, t) / s.sigma, posterior_std(s, t)]).astype(dtype)


def _mean(x, x0, coef):
    """Posterior mean ``alpha_t x0 + sigma_t e^{-h} (x - alpha_s x0) / sigma_s`` (coefficients per example)."""
    alpha_s, alpha_t, c, _ = (broadcast_to(v, x) for v in coef)
    return alpha_t * x0 + c * (x - alpha_s * x0)


def _evaluate(denoise: Callable, x: Array, t: Array, name: str) -> Array:
    out = denoise(x, t)
    if out.shape != x.shape:
        raise ValueError(f"{name} must return an array of the shape of x {x.shape}; got {out.shape}.")
    return out


def speculative_sample(
    target: Callable,
    draft,
    process,
    x_T: Array,
    key: Array,
    *,
    steps: int,
    grid="uniform",
    K: int = 4,
    final_zero: bool | None = None,
):
    """Exact samples of the target's ancestral sampler, drafted ``K`` steps at a time.

    Args:
      target: the target denoiser ``target(x_t, t) -> x0_hat``, called with ``x_t`` of the shape of
        ``x_T`` and ``t`` of shape ``(batch,)`` (``vmap``-ed over a round's ``K + 1`` states, so a
        class-conditional denoiser closing over ``(batch,)`` labels works).
      draft: a draft denoiser with the same contract, or ``"frozen"`` (the target's ``x0``
        at the last verified state, held fixed over a round; no draft evaluations).
      process: the forward process of both denoisers.
      x_T: starting noise, shape ``(batch, ...)``.
      key: PRNG key (draft noise, acceptance uniforms, free steps).
      steps: grid intervals (static), as in :func:`difflax.sample`; with a grid ending in an
        exact 0 the last one is the final denoising step.
      grid: a grid name (default ``"uniform"``) or an array of decreasing times.
      K: draft proposals per round (static, ``>= 1``).
      final_zero: as in :func:`difflax.sample` (default ``True`` for named grids).

    Returns:
      ``(x, info)``. ``info`` holds ``target_calls`` (sequential batched target calls, one per
      round), ``target_nfe`` (example-states the target evaluated: ``target_calls * batch *
      (K + 1)``, finished examples and proposals past the end included), ``draft_calls`` and
      ``draft_nfe`` (likewise; 0 for ``"frozen"``), ``nfe`` (target evaluations per example:
      ``target_calls * (K + 1)``), ``accepted_length`` (mean accepted proposals per example
      and round), ``acceptance_rate`` (accepted / verified proposals), ``mean_advance``
      (mean grid steps per example and round, the final denoising step included),
      ``rounds_per_example`` (mean rounds an example needed), ``steps`` and ``ts``. The
      plain ancestral sampler makes ``steps`` sequential calls of ``batch`` examples each.
    """
    K = check_positive_int(K, "K (draft proposals per round)")
    if isinstance(draft, str):
        if draft != "frozen":
            raise ValueError(f"draft must be a denoiser or 'frozen'; got {draft!r}.")
        frozen = True
    elif callable(draft):
        frozen = False
    else:
        raise TypeError(f"draft must be a denoiser or 'frozen'; got {type(draft).__name__}.")
    if key is None:
        raise ValueError("speculative_sample is stochastic; pass key=jax.random.key(...).")
    x_T = jnp.asarray(x_T)
    check_batched(x_T, "x_T")
    ts, final_zero = resolve_grid(grid, DDPM(), process, steps, final_zero)
    pos = ts[:-1] if final_zero else ts  # the positive times the chain visits
    N = pos.shape[0] - 1  # stochastic transitions
    if N < 1:
        raise ValueError(f"steps must leave at least one stochastic transition; got steps={steps} with this grid.")
    B = x_T.shape[0]
    event = x_T.shape[1:]
    rows = jnp.arange(B)
    idx = jnp.arange(K + 1, dtype=jnp.int32)
    table = _step_table(process, pos, x_T.dtype)
    times = pos.astype(x_T.dtype)
    step = lambda a: table[:, jnp.minimum(a, N - 1)]  # coefficients of step a (clipped to the grid)

    def take(stack, i):  # stack[i[b], b] for every example b
        return stack[i, rows]

    def round_(carry):
        x, n, done, out, hint, key, rounds, stats = carry
        key, k_noise, k_u = jax.random.split(key, 3)
        r = N - n  # transitions left
        active = ~done
        noise = jax.random.normal(k_noise, (K + 1, B, *event), x.dtype)  # K proposals and the free step
        z = noise[:K]

        # 1. Draft K transitions (sequential, per-example grid positions).
        def draft_step(y, inputs):
            i, z_i = inputs
            coef = step(n + i)
            x0 = hint if frozen else _evaluate(draft, y, times[jnp.minimum(n + i, N)], "draft")
            mean_q = _mean(y, x0, coef)
            y_next = jnp.where(broadcast_to(i < r, y), mean_q + broadcast_to(coef[3], y) * z_i, y)
            return y_next, (y_next, mean_q)

        _, (proposals, means_q) = jax.lax.scan(draft_step, x, (idx[:K], z))
        states = jnp.concatenate([x[None], proposals])  # (K + 1, B, ...): y_0 .. y_K

        # 2. One batched target call on all K + 1 states.
        t_states = times[jnp.minimum(n[None] + idx[:, None], N)]  # (K + 1, B)
        x0p = jax.vmap(lambda y, t: _evaluate(target, y, t, "target"))(states, t_states)

        # 3.-4. Verify the K transitions y_i -> y_{i+1}; reflect at the first rejection.
        coef = step(n[None] + idx[:K, None])  # (4, K, B)
        means_p = _mean(states[:K], x0p[:K], coef)
        u = jax.random.uniform(k_u, (K, B), x.dtype)
        _, replaced, coupled = reflection_coupling(z, u, means_q, means_p, coef[3])
        valid = idx[:K, None] < r[None]
        rejected = valid & ~coupled
        any_rejected = jnp.any(rejected, axis=0)
        j = jnp.argmax(rejected, axis=0).astype(jnp.int32)  # first rejection (when any)
        accepted = jnp.where(any_rejected, j, jnp.minimum(r, K))

        # No rejection and the grid ends within the round: the last proposal is x_N.
        finishing = ~any_rejected & (r <= K)
        last = jnp.minimum(r, K)
        final = take(x0p, last) if final_zero else take(states, last)

        # No rejection and grid left: a free target transition from y_K.
        coef = step(n + K)
        free = _mean(states[K], x0p[K], coef) + broadcast_to(coef[3], x) * noise[K]

        new_x = jnp.where(broadcast_to(any_rejected, x), take(replaced, j), free)
        new_n = jnp.where(any_rejected, n + j + 1, n + K + 1)
        new_hint = jnp.where(broadcast_to(any_rejected, x), take(x0p, j), x0p[K])
        new_done = finishing
        if not final_zero:  # the state at index N is the output
            reached = ~finishing & (new_n == N)
            final = jnp.where(broadcast_to(reached, x), new_x, final)
            new_done = finishing | reached
        advance = jnp.where(any_rejected, j + 1, jnp.where(finishing, r + int(final_zero), K + 1))

        upd = lambda new, old: jnp.where(broadcast_to(active, old), new, old)
        x = upd(new_x, x)
        hint = upd(new_hint, hint)
        n = jnp.where(active & ~new_done, new_n, n)
        out = jnp.where(broadcast_to(active & new_done, out), final, out)
        done = done | (active & new_done)
        count = lambda v: jnp.sum(jnp.where(active, v, 0), dtype=jnp.int32)
        stats = {
            "accepted": stats["accepted"] + count(accepted),
            "verified": stats["verified"] + count(accepted + any_rejected),
            "advance": stats["advance"] + count(advance),
            "example_rounds": stats["example_rounds"] + count(1),
        }
        return x, n, done, out, hint, key, rounds + 1, stats

    def not_done(carry):
        done, rounds = carry[2], carry[6]
        return ~jnp.all(done) & (rounds <= N)  # every round advances each example by >= 1 step

    zero = jnp.zeros((), jnp.int32)
    stats = {"accepted": zero, "verified": zero, "advance": zero, "example_rounds": zero}
    carry = (
        x_T,
        jnp.zeros((B,), jnp.int32),
        jnp.zeros((B,), bool),
        jnp.zeros_like(x_T),
        jnp.zeros_like(x_T),
        key,
        zero,
        stats,
    )
    _, _, _, out, _, _, rounds, stats = jax.lax.while_loop(not_done, round_, carry)
    draft_calls = jnp.zeros((), jnp.int32) if frozen else rounds * K
    rounds_f = stats["example_rounds"].astype(x_T.dtype)
    info = {
        "target_calls": rounds,
        "target_nfe": rounds * B * (K + 1),
        "draft_calls": draft_calls,
        "draft_nfe": draft_calls * B,
        "nfe": rounds * (K + 1),
        "accepted_length": stats["accepted"] / rounds_f,
        "acceptance_rate": stats["accepted"] / jnp.maximum(stats["verified"], 1).astype(x_T.dtype),
        "mean_advance": stats["advance"] / rounds_f,
        "rounds_per_example": rounds_f / B,
        "steps": ts.shape[0] - 1,
        "ts": ts,
    }
    return out, info
