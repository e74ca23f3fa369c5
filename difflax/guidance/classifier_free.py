r"""Classifier-free guidance (Ho & Salimans 2021) and its variants, as denoiser transforms.

With ``D_c`` the conditional and ``D_u`` the unconditional (null-condition) prediction,

    D = D_u + gamma (D_c - D_u),

applied to x0 predictions: :func:`cfg` (one batched network call), :func:`cfg_separate`
(two denoisers, e.g. autoguidance), optionally limited to an interval of noise levels
(Kynkäänniemi et al. 2024) and with CFG rescale (Lin et al. 2024); adaptive projected
guidance (Sadat et al. 2024: :func:`apg`, :func:`apg_update`); and the product of
experts of several conditions (Liu et al. 2022: :func:`compose`). Scales may be traced
and per example.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from difflax.checks import check_choice, concrete_float
from difflax.conditions import ConditionalDenoiser, batch_condition, call_branches, null_like
from difflax.parametrization import Denoiser, convert
from difflax.processes import Process, broadcast_to

CONVENTIONS = ("gamma", "w")
RESCALE_SPACES = ("v", "eps", "x0")

__all__ = ["CONVENTIONS", "RESCALE_SPACES", "apg", "apg_update", "cfg", "cfg_separate", "compose", "guidance_gamma"]


def _batch_axes(x):
    return tuple(range(1, x.ndim))


def _require_process(process, what):
    if process is None:
        raise ValueError(f"{what} needs the process (pass process=...) to map t to alpha and sigma.")
    return process


def guidance_gamma(scale, convention: str = "gamma"):
    """The guidance weight ``gamma`` of ``D = D_u + gamma (D_c - D_u)`` for a ``scale`` in ``convention``.

    ``"gamma"``: ``gamma = scale`` (``gamma = 1`` is the conditional model, ``0`` the
    unconditional one; the scale of Karras et al. 2024 and of most codebases, e.g. Stable
    Diffusion's 7.5). ``"w"``: Ho & Salimans 2021's ``D = (1 + w) D_c - w D_u``, so
    ``gamma = 1 + w`` (``w = 0`` is the conditional model).
    """
    check_choice(convention, CONVENTIONS, "convention")
    return scale if convention == "gamma" else 1.0 + jnp.asarray(scale)


def _cfg_rescale(guided, d_c, phi, space, x, t, process):
    """CFG rescale of Lin et al. 2024 (eq. 15-16) in ``space``; returns x0."""
    if space != "x0":
        process = _require_process(process, f"CFG rescale in space {space!r}")
        alpha, sigma = (broadcast_to(c, x) for c in process.alpha_sigma(t))
        g = convert(guided, "x0", space, x, alpha, sigma)
        c = convert(d_c, "x0", space, x, alpha, sigma)
    else:
        g, c = guided, d_c
    axes = _batch_axes(x)
    std_c = jnp.std(c, axis=axes, keepdims=True)
    std_g = jnp.std(g, axis=axes, keepdims=True)
    ratio = jnp.where(std_g > 0, std_c / jnp.where(std_g > 0, std_g, 1.0), 1.0)
    phi = broadcast_to(phi, x)
    g = g * (phi * ratio + (1.0 - phi))
    return g if space == "x0" else convert(g, space, "x0", x, alpha, sigma)


def _check_interval(interval, process):
    if interval is None:
        return None
    _require_process(process, "guidance limited to an interval")
    try:
        lo, hi = interval
    except (TypeError, ValueError):
        raise ValueError(f"interval must be a pair (sigma_lo, sigma_hi); got {interval!r}.") from None
    lo_f, hi_f = concrete_float(lo), concrete_float(hi)
    if lo_f is not None and hi_f is not None and not lo_f < hi_f:
        raise ValueError(f"interval must have sigma_lo < sigma_hi; got {interval!r}.")
    return lo, hi


def _linear_rule(gamma, process, rescale, rescale_space):
    """``combine(d_c, d_u, x, t)`` for CFG with optional rescale."""
    check_choice(rescale_space, RESCALE_SPACES, "rescale_space")

    def combine(d_c, d_u, x, t):
        guided = d_u + broadcast_to(gamma, x) * (d_c - d_u)
        if rescale is not None:
            guided = _cfg_rescale(guided, d_c, rescale, rescale_space, x, t, process)
        return guided

    return combine


def _with_interval(interval, process, both, cond_only, combine):
    """Guided denoiser applying ``combine`` where the EDM noise level lies in the interval."""

    def guided(x, t):
        if interval is None:
            d_c, d_u = both(x, t)
            return combine(d_c, d_u, x, t)
        lo, hi = interval
        alpha, sigma = process.alpha_sigma(t)
        level = jnp.broadcast_to(sigma / alpha, (x.shape[0],))
        inside = (level > lo) & (level <= hi)

        def guided_branch(x):
            d_c, d_u = both(x, t)
            return jnp.where(broadcast_to(inside, x), combine(d_c, d_u, x, t), d_c)

        # Outside the interval only the conditional branch is evaluated (half the work).
        return jax.lax.cond(jnp.any(inside), guided_branch, lambda x: cond_only(x, t), x)

    return guided


def cfg(
    denoise_cond: ConditionalDenoiser,
    y,
    scale,
    *,
    null,
    convention: str = "gamma",
    process: Process | None = None,
    interval: tuple | None = None,
    rescale=None,
    rescale_space: str = "v",
) -> Denoiser:
    r"""Classifier-free guidance (Ho & Salimans 2021) with one batched network call.

    The conditional and unconditional predictions come from a single call of
    ``denoise_cond`` on ``[x_t, x_t]`` with conditions ``[y, null]`` (batch ``2B``), and are
    combined as

        D = D_u + gamma (D_c - D_u)                      (convention "gamma", scale = gamma)
          = (1 + w) D_c - w D_u                          (convention "w", scale = w),

    so ``gamma = 1 + w``: ``gamma = 1`` / ``w = 0`` is the conditional model, ``gamma = 0``
    / ``w = -1`` the unconditional one, and "guidance scale 7.5" in Stable Diffusion is
    ``gamma = 7.5`` (``w = 6.5``). Because the rule is affine with weights summing to one,
    it is the same whether applied to x0, eps, v or score predictions: in score space it
    is ``grad log p_u + gamma grad log p(y | x_t)``, sampling ``p(x) p(y | x)^gamma``
    heuristically. ``scale`` may be traced and may be per example (shape ``(B,)``).

    Args:
      denoise_cond: conditional denoiser ``(x_t, t, y) -> x0_hat``.
      y: the condition, a pytree whose leaves have the batch axis (scalars broadcast).
      scale: ``gamma`` or ``w`` according to ``convention``.
      null: null label id or null embedding (pytree), see :func:`null_like`.
      convention: ``"gamma"`` or ``"w"`` (see above).
      process: needed for ``interval`` and for ``rescale`` outside x0 space.
      interval: ``(sigma_lo, sigma_hi)``: guide only where the EDM noise level
        ``sigma / alpha`` lies in ``(sigma_lo, sigma_hi]`` and return the conditional
        prediction elsewhere (Kynkäänniemi et al. 2024, "Applying guidance in a limited
        interval improves sample and distribution quality in diffusion models"; e.g.
        ``(0.28, 5.42]`` for EDM2-XL on ImageNet-512). Where no example of the batch lies in
        the interval only the conditional branch is evaluated (``lax.cond``).
      rescale: ``phi`` of CFG rescale (Lin et al. 2024, "Common diffusion noise schedules
        and sample steps are flawed", eq. 15-16): with ``x_cfg`` the guided prediction and
        ``x_pos`` the conditional one in ``rescale_space``, per example
        ``x_rescaled = x_cfg std(x_pos) / std(x_cfg)`` (std over all non-batch axes) and
        ``x_final = phi x_rescaled + (1 - phi) x_cfg``. ``None`` (default) or ``phi = 0``
        is plain CFG; the paper uses ``phi = 0.7``.
      rescale_space: where the std is matched. ``"v"`` (default) is the space of Lin et
        al.'s v-prediction network, where the paper applies it;
        ``"eps"`` is Diffusers' ``rescale_noise_cfg`` on an eps-prediction model;
        ``"x0"`` matches the std of the predicted images. Std is not affine-invariant, so
        the three differ.
    """
    check_choice(convention, CONVENTIONS, "convention")
    interval = _check_interval(interval, process)
    gamma = guidance_gamma(scale, convention)
    combine = _linear_rule(gamma, process, rescale, rescale_space)

    def both(x, t):
        yb = batch_condition(y, x.shape[0])
        return tuple(call_branches(denoise_cond, x, t, [yb, null_like(null, yb)]))

    def cond_only(x, t):
        return denoise_cond(x, jnp.broadcast_to(t, (x.shape[0],)), batch_condition(y, x.shape[0]))

    return _with_interval(interval, process, both, cond_only, combine)


def cfg_separate(
    denoise_cond: Denoiser,
    denoise_uncond: Denoiser,
    scale,
    *,
    convention: str = "gamma",
    process: Process | None = None,
    interval: tuple | None = None,
    rescale=None,
    rescale_space: str = "v",
) -> Denoiser:
    """Classifier-free guidance from two denoisers ``(x_t, t) -> x0_hat``, two calls per step.

    The same rule and options as :func:`cfg`, for a conditional denoiser with its
    condition already closed over and a *separate* unconditional (or weaker, as in
    autoguidance, Karras et al. 2024) denoiser. With one network prefer :func:`cfg`,
    which evaluates both branches in one batched call.
    """
    check_choice(convention, CONVENTIONS, "convention")
    interval = _check_interval(interval, process)
    combine = _linear_rule(guidance_gamma(scale, convention), process, rescale, rescale_space)
    return _with_interval(
        interval, process, lambda x, t: (denoise_cond(x, t), denoise_uncond(x, t)), denoise_cond, combine
    )


def apg_update(d_cond, d_uncond, scale, *, eta=0.0, norm_threshold=None, momentum=None, buffer=None,
               convention: str = "gamma"):
    r"""Adaptive projected guidance (Sadat et al. 2024, "Eliminating oversaturation and artifacts of
    high guidance scales in diffusion models"), one step on x0 predictions.

    With ``Delta = D_c - D_u`` (the CFG update in x0 space):

    1. momentum (optional): ``Delta <- Delta + beta * buffer`` and ``buffer <- Delta``
       (``beta = momentum``, the paper recommends negative values, e.g. ``-0.5``);
    2. norm threshold (optional): ``Delta <- Delta min(1, r / ||Delta||)`` per example;
    3. projection on ``D_c`` per example: ``Delta_par = (<Delta, D_c> / ||D_c||^2) D_c``,
       ``Delta_perp = Delta - Delta_par``;
    4. ``D = D_c + (gamma - 1) (Delta_perp + eta Delta_par)``.

    With ``eta = 1``, no threshold and no momentum this is CFG. The parallel component is
    what oversaturates at high scales, so the paper uses ``eta = 0``. Returns
    ``(guided, buffer)``; ``buffer`` is ``None`` without momentum. A denoiser is pure, so
    momentum state must be carried by the caller's sampling loop: pass the returned
    ``buffer`` to the next step (start with ``None``, i.e. zeros).
    """
    gamma = guidance_gamma(scale, convention)
    diff = d_cond - d_uncond
    axes = _batch_axes(diff)
    if momentum is not None:
        diff = diff + broadcast_to(momentum, diff) * (jnp.zeros_like(diff) if buffer is None else buffer)
        buffer = diff
    if norm_threshold is not None:
        norm = jnp.sqrt(jnp.sum(diff**2, axis=axes, keepdims=True))
        r = broadcast_to(norm_threshold, diff)
        diff = diff * jnp.minimum(1.0, r / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny))
    c_norm = jnp.sqrt(jnp.sum(d_cond**2, axis=axes, keepdims=True))
    unit = d_cond / jnp.maximum(c_norm, 1e-12)
    parallel = jnp.sum(diff * unit, axis=axes, keepdims=True) * unit
    update = (diff - parallel) + broadcast_to(eta, diff) * parallel
    return d_cond + (broadcast_to(gamma, diff) - 1.0) * update, buffer


def apg(
    denoise_cond: ConditionalDenoiser,
    y,
    scale,
    *,
    null,
    eta=0.0,
    norm_threshold=None,
    convention: str = "gamma",
) -> Denoiser:
    """Adaptive projected guidance (:func:`apg_update`) as a denoiser, one batched call per step.

    Supports the parallel down-weighting ``eta`` and the norm threshold ``r``; the
    momentum of the paper needs state across steps, which a denoiser cannot hold: use
    :func:`apg_update` in your own loop for it.
    """
    check_choice(convention, CONVENTIONS, "convention")

    def guided(x, t):
        yb = batch_condition(y, x.shape[0])
        d_c, d_u = call_branches(denoise_cond, x, t, [yb, null_like(null, yb)])
        return apg_update(d_c, d_u, scale, eta=eta, norm_threshold=norm_threshold, convention=convention)[0]

    return guided


def compose(denoise_cond: ConditionalDenoiser, conditions: Sequence, weights, *, null) -> Denoiser:
    r"""Composition of conditions as a product of experts (Liu et al. 2022, "Compositional visual
    generation with composable diffusion models", the conjunction "AND"):

        D = D_u + sum_i w_i (D(x_t, t, y_i) - D_u),

    i.e. the score of ``p(x) prod_i p(y_i | x)^{w_i}`` (a negative ``w_i`` is their
    "NOT"). All ``n`` conditions and the null condition are evaluated in ONE call of batch
    ``(n + 1) B``. ``weights`` has shape ``(n,)`` (or ``(n, B)`` per example) and may be
    traced; with one condition this is :func:`cfg` with ``gamma = w_1``.
    """
    conditions = list(conditions)
    if not conditions:
        raise ValueError("conditions must hold at least one condition.")
    w = jnp.asarray(weights)
    if w.ndim == 0 or w.shape[0] != len(conditions):
        raise ValueError(f"weights must have one entry per condition ({len(conditions)}); got shape {w.shape}.")

    def guided(x, t):
        ys = [batch_condition(y, x.shape[0]) for y in conditions]
        outs = call_branches(denoise_cond, x, t, [*ys, null_like(null, ys[0])])
        d_u = outs[-1]
        total = d_u
        for i, d_i in enumerate(outs[:-1]):
            total = total + broadcast_to(w[i], x) * (d_i - d_u)
        return total

    return guided
