r"""Guidance and conditional generation as denoiser transforms.

Every transform here takes denoisers and returns a denoiser (``denoise(x_t, t) -> x0_hat``),
so transforms compose like optax transforms and every result works with every solver::

    guided = dynamic_threshold(cfg(denoise_cond, y, 4.0, null=NULL), percentile=0.995)
    x0, info = difflax.sample(guided, process, x_T, solver="ddim", steps=50)

A *conditional denoiser* has the signature ``denoise_cond(x_t, t, y) -> x0_hat``; ``y`` is
any pytree whose leaves carry the batch axis (class ids of shape ``(batch,)``, text
embeddings of shape ``(batch, tokens, dim)``, ...). The *null condition* of a model
trained with condition dropout (:func:`difflax.losses.drop_condition`) is a null label id
or a null embedding; it is broadcast to ``y``'s shape by :func:`null_like`.

Spaces. With ``x_t = alpha x0 + sigma eps`` the x0, eps, v and score predictions are
affine functions of each other at fixed ``(x_t, t)`` (:mod:`difflax.parametrization`),
and an affine map preserves affine combinations whose weights sum to one. Linear
guidance rules such as classifier-free guidance, ``D_u + gamma (D_c - D_u)``, therefore
give the *same* sampler whether they are applied to x0, eps, v or score predictions;
this module applies them to x0. Non-linear rules (CFG rescale, APG, thresholding) depend
on the space and each says which one it uses. All conversions go through
:mod:`difflax.parametrization`.

Contents:

* classifier-free guidance: :func:`cfg` (one batched network call), :func:`cfg_separate`
  (two denoisers, e.g. separate conditional and unconditional networks), guidance limited
  to an interval of noise levels, CFG rescale, adaptive projected guidance (:func:`apg`,
  :func:`apg_update`), and the product of experts of several conditions (:func:`compose`);
* classifier guidance (:func:`classifier_guidance`, :func:`classifier_log_prob`) and
  universal guidance (:func:`universal_guidance`), with :func:`noisy_classifier_loss` to
  train the noise-conditional classifier;
* :func:`dynamic_threshold` (Imagen) and :func:`clip_x0`;
* inpainting and editing: :func:`inpaint` (a denoiser transform), :func:`inpaint_sample`
  (replacement and RePaint resampling, a sampler), :func:`sdedit`;
* linear inverse problems ``y = A x0 + sigma_y n``: :func:`dps_sample` (diffusion posterior
  sampling) and :func:`pigdm` (pseudoinverse-guided), with the operators
  :func:`mask_operator`, :func:`superres_operator` and :func:`blur_operator`.

Scalars a user sweeps (guidance scales, ``phi``, ``eta``, interval bounds, ``zeta``) may be
traced: a guided denoiser built inside ``jax.jit`` from a traced scale never recompiles
when the scale changes.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from difflax.parametrization import Denoiser, convert
from difflax.processes import Process, broadcast_to, check_t
from difflax.solvers import DEFAULT_GRIDS, make_grid, resolve_grid, resolve_solver, sample
from difflax.solvers.base import call, coefficients, exp_neg_h, finish, time_vector

Array = jax.Array
ConditionalDenoiser = Callable[[Array, Array, Any], Array]

CONVENTIONS = ("gamma", "w")
FORMS = ("score", "eps")
RESCALE_SPACES = ("v", "eps", "x0")
COVARIANCES = ("isotropic", "tweedie")
# Solvers that evaluate the denoiser exactly once per step, at the current (x, t):
# DPS reuses that evaluation (and its gradient) for the solver's own step.
SINGLE_CALL_SOLVERS = ("ddpm", "ddim", "euler")

__all__ = [
    "CONVENTIONS",
    "COVARIANCES",
    "FORMS",
    "RESCALE_SPACES",
    "ConditionalDenoiser",
    "LinearOperator",
    "apg",
    "apg_update",
    "blur_operator",
    "cfg",
    "cfg_separate",
    "classifier_guidance",
    "classifier_log_prob",
    "clip_x0",
    "compose",
    "dps_sample",
    "dynamic_threshold",
    "guidance_gamma",
    "inpaint",
    "inpaint_sample",
    "mask_operator",
    "noisy_classifier_loss",
    "null_like",
    "pigdm",
    "sdedit",
    "superres_operator",
    "universal_guidance",
]


# ----------------------------------------------------------------------------------------------
# Helpers.


def _check_choice(value, allowed, name):
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {', '.join(map(repr, allowed))}.")
    return value


def _concrete_float(x):
    """``float(x)`` for a concrete scalar, ``None`` for a traced one."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _alpha_sigma(process: Process, t, x):
    alpha, sigma = process.alpha_sigma(t)
    return broadcast_to(alpha, x), broadcast_to(sigma, x)


def _batch_axes(x):
    return tuple(range(1, x.ndim))


def _per_example(c, x):
    """A scalar or ``(batch,)`` coefficient, broadcast against ``x``."""
    return broadcast_to(jnp.asarray(c), x)


def _require_process(process, what):
    if process is None:
        raise ValueError(f"{what} needs the process (pass process=...) to map t to alpha and sigma.")
    return process


def _batch_condition(y, batch: int):
    """Give every leaf of ``y`` the leading batch axis ``batch`` (scalars and size-1 axes broadcast)."""

    def fix(leaf):
        leaf = jnp.asarray(leaf)
        if leaf.ndim == 0:
            return jnp.broadcast_to(leaf, (batch,))
        if leaf.shape[0] == batch:
            return leaf
        if leaf.shape[0] == 1:
            return jnp.broadcast_to(leaf, (batch, *leaf.shape[1:]))
        raise ValueError(
            f"y: every leaf of the condition must be a scalar or have the batch size {batch} (or 1) as its "
            f"leading axis; got a leaf of shape {leaf.shape}."
        )

    return jax.tree.map(fix, y)


def null_like(null, y):
    """The null condition in the shape and dtype of ``y``.

    ``null`` is a null label id (a scalar, broadcast to every label), a null embedding of
    one example's shape (e.g. ``(tokens, dim)``, broadcast over the batch), an array of
    ``y``'s full shape, or a pytree of these with ``y``'s structure.
    """
    y_leaves, treedef = jax.tree.flatten(y)
    null_leaves, null_def = jax.tree.flatten(null)
    if null_def == treedef:
        pairs = zip(null_leaves, y_leaves, strict=True)
    elif len(null_leaves) == 1:
        pairs = ((null_leaves[0], leaf) for leaf in y_leaves)
    else:
        raise ValueError(
            f"null must be a single array (label id or embedding) or a pytree with the structure of y; "
            f"got structure {null_def} for y of structure {treedef}."
        )

    def fix(n, leaf):
        leaf = jnp.asarray(leaf)
        n = jnp.asarray(n, dtype=leaf.dtype)
        if n.shape == leaf.shape or n.shape == leaf.shape[1:] or n.ndim == 0:
            return jnp.broadcast_to(n, leaf.shape)
        raise ValueError(
            f"null has shape {n.shape}, which fits neither one example {leaf.shape[1:]} nor the batch "
            f"{leaf.shape} of the condition y."
        )

    return jax.tree.unflatten(treedef, [fix(n, leaf) for n, leaf in pairs])


def _call_branches(denoise_cond: ConditionalDenoiser, x, t, conds):
    """Evaluate ``denoise_cond`` on ``len(conds)`` copies of ``x`` in ONE batched call."""
    n, batch = len(conds), x.shape[0]
    t_b = jnp.broadcast_to(jnp.asarray(t, dtype=jnp.result_type(t, float)), (batch,))
    ys = jax.tree.map(lambda *leaves: jnp.concatenate(leaves, axis=0), *conds)
    out = denoise_cond(jnp.concatenate([x] * n, axis=0), jnp.concatenate([t_b] * n), ys)
    if out.shape != (n * batch, *x.shape[1:]):
        raise ValueError(
            f"denoise_cond must return an array of the shape of its input {(n * batch, *x.shape[1:])}; got {out.shape}."
        )
    return jnp.split(out, n, axis=0)


def guidance_gamma(scale, convention: str = "gamma"):
    """The guidance weight ``gamma`` of ``D = D_u + gamma (D_c - D_u)`` for a ``scale`` in ``convention``.

    ``"gamma"``: ``gamma = scale`` (``gamma = 1`` is the conditional model, ``0`` the
    unconditional one; the scale of Karras et al. 2024 and of most codebases, e.g. Stable
    Diffusion's 7.5). ``"w"``: Ho & Salimans 2021's ``D = (1 + w) D_c - w D_u``, so
    ``gamma = 1 + w`` (``w = 0`` is the conditional model).
    """
    _check_choice(convention, CONVENTIONS, "convention")
    return scale if convention == "gamma" else 1.0 + jnp.asarray(scale)


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance.


def _cfg_rescale(guided, d_c, phi, space, x, t, process):
    """CFG rescale of Lin et al. 2024 (eq. 15-16) in ``space``; returns x0."""
    if space != "x0":
        alpha, sigma = _alpha_sigma(_require_process(process, f"CFG rescale in space {space!r}"), t, x)
        g = convert(guided, "x0", space, x, alpha, sigma)
        c = convert(d_c, "x0", space, x, alpha, sigma)
    else:
        g, c = guided, d_c
    axes = _batch_axes(x)
    std_c = jnp.std(c, axis=axes, keepdims=True)
    std_g = jnp.std(g, axis=axes, keepdims=True)
    ratio = jnp.where(std_g > 0, std_c / jnp.where(std_g > 0, std_g, 1.0), 1.0)
    phi = _per_example(phi, x)
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
    lo_f, hi_f = _concrete_float(lo), _concrete_float(hi)
    if lo_f is not None and hi_f is not None and not lo_f < hi_f:
        raise ValueError(f"interval must have sigma_lo < sigma_hi; got {interval!r}.")
    return lo, hi


def _linear_rule(gamma, process, rescale, rescale_space):
    """``combine(d_c, d_u, x, t)`` for CFG with optional rescale."""
    _check_choice(rescale_space, RESCALE_SPACES, "rescale_space")

    def combine(d_c, d_u, x, t):
        guided = d_u + _per_example(gamma, x) * (d_c - d_u)
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
        al.'s v-prediction network, where the paper applies it (ComfyUI's RescaleCFG too);
        ``"eps"`` is Diffusers' ``rescale_noise_cfg`` on an eps-prediction model;
        ``"x0"`` matches the std of the predicted images. Std is not affine-invariant, so
        the three differ.
    """
    _check_choice(convention, CONVENTIONS, "convention")
    interval = _check_interval(interval, process)
    gamma = guidance_gamma(scale, convention)
    combine = _linear_rule(gamma, process, rescale, rescale_space)

    def both(x, t):
        yb = _batch_condition(y, x.shape[0])
        return tuple(_call_branches(denoise_cond, x, t, [yb, null_like(null, yb)]))

    def cond_only(x, t):
        return denoise_cond(x, jnp.broadcast_to(t, (x.shape[0],)), _batch_condition(y, x.shape[0]))

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
    _check_choice(convention, CONVENTIONS, "convention")
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
        diff = diff + _per_example(momentum, diff) * (jnp.zeros_like(diff) if buffer is None else buffer)
        buffer = diff
    if norm_threshold is not None:
        norm = jnp.sqrt(jnp.sum(diff**2, axis=axes, keepdims=True))
        r = _per_example(norm_threshold, diff)
        diff = diff * jnp.minimum(1.0, r / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny))
    c_norm = jnp.sqrt(jnp.sum(d_cond**2, axis=axes, keepdims=True))
    unit = d_cond / jnp.maximum(c_norm, 1e-12)
    parallel = jnp.sum(diff * unit, axis=axes, keepdims=True) * unit
    update = (diff - parallel) + _per_example(eta, diff) * parallel
    return d_cond + (_per_example(gamma, diff) - 1.0) * update, buffer


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
    _check_choice(convention, CONVENTIONS, "convention")

    def guided(x, t):
        yb = _batch_condition(y, x.shape[0])
        d_c, d_u = _call_branches(denoise_cond, x, t, [yb, null_like(null, yb)])
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
        ys = [_batch_condition(y, x.shape[0]) for y in conditions]
        outs = _call_branches(denoise_cond, x, t, [*ys, null_like(null, ys[0])])
        d_u = outs[-1]
        total = d_u
        for i, d_i in enumerate(outs[:-1]):
            total = total + _per_example(w[i], x) * (d_i - d_u)
        return total

    return guided


# ----------------------------------------------------------------------------------------------
# Classifier and universal guidance.


def _add_score(x0, grad, scale, form, x, t, process):
    """Move ``x0`` by ``scale * grad`` added to the score (score form) or eps form, back via Tweedie."""
    alpha, sigma = _alpha_sigma(process, t, x)
    s = _per_example(scale, x)
    if form == "score":
        score = convert(x0, "x0", "score", x, alpha, sigma) + s * grad
        return convert(score, "score", "x0", x, alpha, sigma)
    eps = convert(x0, "x0", "eps", x, alpha, sigma) - s * sigma * grad
    return convert(eps, "eps", "x0", x, alpha, sigma)


def classifier_guidance(
    denoise: Denoiser, process: Process, log_prob_fn: Callable, scale, *, form: str = "score"
) -> Denoiser:
    r"""Classifier guidance (Dhariwal & Nichol 2021) from any differentiable ``log p(y | x_t, t)``.

    ``log_prob_fn(x_t, t) -> (batch,)`` is the log-probability of the target class under a
    noise-conditional classifier (the target closed over, see :func:`classifier_log_prob`);
    ``g = grad_{x_t} log p(y | x_t)`` is taken with ``jax.grad`` of its sum over the batch,
    so examples must not interact. Two forms, with ``s = scale``:

    * ``"score"``: ``score_guided = score + s g``, by Bayes' rule the score of
      ``p(x_t) p(y | x_t)^s`` (Song et al. 2021, "Score-based generative modeling
      through SDEs", sec. 5);
    * ``"eps"`` (Dhariwal & Nichol alg. 2): ``eps_guided = eps - s sqrt(1 - alpha_bar) g``,
      with ``sqrt(1 - alpha_bar) = sigma`` (for non-VP processes the general relation
      ``eps = -sigma score`` gives the same ``sigma``).

    Both are mapped back to x0 by Tweedie's formula, ``x0 = (x_t + sigma^2 score) / alpha``;
    they are the same in exact arithmetic and are offered to match either paper's
    formula. With the exact ``log p(y | x_t)`` and ``s = 1`` the result is the exact
    class-conditional denoiser. (Dhariwal & Nichol's alg. 1 shifts the ancestral step's
    mean by ``s Sigma g`` instead; with ``solver="ddpm"`` the score form differs from it
    only by the step's discretization.)
    """
    _check_choice(form, FORMS, "form")

    def guided(x, t):
        x0 = denoise(x, t)
        grad = jax.grad(lambda z: jnp.sum(log_prob_fn(z, t)))(x)
        return _add_score(x0, grad, scale, form, x, t, process)

    return guided


def classifier_log_prob(logits_fn: Callable, y) -> Callable:
    """``log_prob_fn(x_t, t) = log_softmax(logits_fn(x_t, t))[y]`` for :func:`classifier_guidance`.

    ``y`` holds integer classes (a scalar or shape ``(batch,)``).
    """

    def log_prob(x, t):
        logp = jax.nn.log_softmax(logits_fn(x, t), axis=-1)
        labels = jnp.broadcast_to(jnp.asarray(y), logp.shape[:1]).astype(jnp.int32)
        return jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]

    return log_prob


def noisy_classifier_loss(logits_fn: Callable, process: Process, x0, y, t, eps) -> Array:
    """Cross-entropy of a noise-conditional classifier on ``x_t = alpha(t) x0 + sigma(t) eps``.

    ``logits_fn(x_t, t) -> (batch, classes)``; ``y`` holds integer labels ``(batch,)`` or
    class probabilities ``(batch, classes)``. Returns one value per example. This is the
    classifier of Dhariwal & Nichol 2021 (sec. 4), trained on the noisy marginals of the
    diffusion process so that its gradient is ``grad_{x_t} log p(y | x_t)`` at every
    ``t``; draw ``t`` and ``eps`` as for the denoising loss.
    """
    x_t = process.marginal(x0, t, eps)
    logp = jax.nn.log_softmax(logits_fn(x_t, t), axis=-1)
    y = jnp.asarray(y)
    if y.ndim == logp.ndim:
        return -jnp.sum(y * logp, axis=-1)
    if y.shape != logp.shape[:1]:
        raise ValueError(f"y must hold integer labels of shape {logp.shape[:1]} or probabilities {logp.shape}; "
                         f"got shape {y.shape}.")
    return -jnp.take_along_axis(logp, y.astype(jnp.int32)[:, None], axis=-1)[:, 0]


def universal_guidance(
    denoise: Denoiser, process: Process, log_prob_fn: Callable, scale, *, form: str = "score"
) -> Denoiser:
    r"""Forward universal guidance (Bansal et al. 2023, "Universal guidance for diffusion models").

    A *clean-data* model ``log_prob_fn(x0) -> (batch,)`` (a classifier, a negative loss,
    ...) is applied to the prediction ``x0_hat(x_t)``, and its gradient flows back
    through the denoiser: ``g = J^T grad log p(y | x0_hat)``, ``J = d x0_hat / d x_t``.
    ``g`` then enters the score (or eps) as in :func:`classifier_guidance`:
    Bansal et al.'s ``eps_hat + s sqrt(1 - alpha_bar) grad loss`` is ``form="eps"`` with
    ``log p = -loss``. One forward and one backward pass of the denoiser per evaluation
    (``jax.vjp``). Their backward guidance and self-recurrence are not included.
    """
    _check_choice(form, FORMS, "form")

    def guided(x, t):
        x0, vjp = jax.vjp(lambda z: denoise(z, t), x)
        g0 = jax.grad(lambda u: jnp.sum(log_prob_fn(u)))(x0)
        (grad,) = vjp(g0)
        return _add_score(x0, grad, scale, form, x, t, process)

    return guided


# ----------------------------------------------------------------------------------------------
# Thresholding.


def dynamic_threshold(denoise: Denoiser, percentile=0.995, *, max_value=1.0) -> Denoiser:
    """Dynamic thresholding of x0 predictions (Saharia et al. 2022, "Imagen", sec. 2.3).

    Per example, ``s = max(quantile(|x0_hat|, percentile), max_value)`` over all non-batch
    axes; ``x0_hat`` is clipped to ``[-s, s]`` and scaled by ``max_value / s``, so the
    output lies in ``[-max_value, max_value]`` (Imagen: ``percentile = 0.995`` i.e. the
    99.5th percentile, ``max_value = 1`` for data in ``[-1, 1]``). Predictions already in
    range are returned unchanged (``s = max_value``).
    """
    p = _concrete_float(percentile)
    if p is not None and not 0.0 < p <= 1.0:
        raise ValueError(f"percentile must be a fraction in (0, 1] (e.g. 0.995); got {percentile!r}.")

    def thresholded(x, t):
        x0 = denoise(x, t)
        flat = jnp.abs(x0).reshape(x0.shape[0], -1)
        s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), max_value)
        s = broadcast_to(s, x0)
        return jnp.clip(x0, -s, s) * (max_value / s)

    return thresholded


def clip_x0(denoise: Denoiser, lo=-1.0, hi=1.0) -> Denoiser:
    """Static thresholding: clip x0 predictions to ``[lo, hi]`` (Ho et al. 2020's ``clip_denoised``)."""
    return lambda x, t: jnp.clip(denoise(x, t), lo, hi)


# ----------------------------------------------------------------------------------------------
# Inpainting and editing.


def _prepare_mask(mask, known, x_shape):
    mask = jnp.asarray(mask)
    try:
        np.broadcast_shapes(mask.shape, tuple(x_shape))
        ok = np.broadcast_shapes(mask.shape, tuple(x_shape)) == tuple(x_shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"mask has shape {mask.shape}, which does not broadcast to the data shape {tuple(x_shape)}.")
    if mask.dtype != jnp.bool_:
        mask = mask != 0
    known = jnp.asarray(known)
    try:
        ok = np.broadcast_shapes(known.shape, tuple(x_shape)) == tuple(x_shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"known has shape {known.shape}, which does not broadcast to the data shape {tuple(x_shape)}.")
    return jnp.broadcast_to(mask, x_shape)


def inpaint(denoise: Denoiser, known, mask) -> Denoiser:
    """Replace the prediction on the mask by the known values: ``D' = m known + (1 - m) D``.

    A denoiser transform, so it works with every solver; ``mask`` (true / 1 where known) and
    ``known`` broadcast to ``x_t``'s shape. The difference from :func:`inpaint_sample`: here
    the known coordinates of ``x_t`` move wherever the solver's update takes them given
    ``x0_hat = known`` there (for DDIM with ``eta = 0`` they stay on
    ``alpha_t known + sigma_t z`` with the ``z`` implied by ``x_T``; stochastic solvers add
    their own noise), nothing resets them to a fresh draw of ``q(x_t | known)`` after each
    step, and only the final denoising step makes them exactly ``known``. The unknown part
    sees the known one through the denoiser's input in both.
    """

    def inpainted(x, t):
        m = _prepare_mask(mask, known, x.shape)
        return jnp.where(m, jnp.asarray(known, x.dtype), denoise(x, t))

    return inpainted


def _setup_solver(solver, solver_args, process, steps, grid):
    name, solver = resolve_solver(solver, solver_args)
    ts, final_zero = resolve_grid(grid, name, process, steps)
    return name, solver, ts, final_zero


def _repaint_moves(num_steps: int, jump_length: int, resample: int):
    """RePaint's time schedule (Lugmayr et al. 2022, ``get_schedule_jump``) as grid-index moves.

    ``num_steps`` solver steps separate the positive grid times (indices ``0 .. num_steps``,
    0 the noisiest). Every ``jump_length`` steps (counted from the clean end) the sampler
    jumps back ``jump_length`` steps, ``resample - 1`` times, so each such segment is
    sampled ``resample`` times. Returns ``(from, to)`` index pairs; ``to < from`` is a jump.
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
    idx = [num_steps - level for level in path]
    return list(itertools.pairwise(idx))


def _forward_transition(process, x, t, t_next, key):
    """A draw of ``q(x_{t_next} | x_t)`` for ``t_next > t`` (noising forward in time)."""
    s, c = coefficients(process, t_next), coefficients(process, t)
    ratio = exp_neg_h(s, c)  # alpha_next sigma_t / (alpha_t sigma_next)
    std = s.sigma * jnp.sqrt(-jnp.expm1(2.0 * jnp.log(ratio)))
    return (s.alpha / c.alpha) * x + std * jax.random.normal(key, x.shape, x.dtype)


def _check_positive_int(value, name):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}.")


def inpaint_sample(
    denoise: Denoiser,
    process: Process,
    x_T: Array,
    known: Array,
    mask: Array,
    key: Array,
    *,
    solver="ddpm",
    steps: int = 50,
    grid=None,
    jump_length: int = 1,
    resample: int = 1,
    return_trajectory: bool = False,
    **solver_args,
):
    r"""Inpainting by replacement (Song et al. 2021, app. I; Lugmayr et al. 2022, "RePaint").

    After every solver step from ``t`` to ``t_next`` the known region is overwritten with a
    fresh draw of the forward marginal, ``x_{t_next}[m] = alpha(t_next) known[m] +
    sigma(t_next) z`` (new ``z`` every step), and the result is exactly ``known`` on the
    mask. This needs access to ``x`` between steps, so unlike the denoiser transform
    :func:`inpaint` it is a sampler: one ``lax.scan`` over the solver protocol
    (``get_solver(name).init / step``) on the grid of :func:`difflax.make_grid`.

    RePaint resampling (``resample = r > 1``): every ``jump_length = j`` steps the
    sampler goes back ``j`` steps by re-noising the whole sample with the forward transition
    ``q(x_{t+j} | x_t) = N(alpha_{t+j} / alpha_t x_t, sigma_{t+j}^2 - (alpha_{t+j} /
    alpha_t)^2 sigma_t^2)`` and redoes them, ``r - 1`` times (the paper's ``U`` with jumps:
    ``j = 10``, ``r = 10``), which lets the unknown region harmonize with the known one.
    The solver's state is re-initialised after each jump. Costs about ``r`` times the
    denoiser calls.

    Args:
      denoise, process, x_T: as in :func:`difflax.sample`.
      known: the known values; ``mask``: true (or 1) where known; both broadcast to ``x_T``.
      key: PRNG key (replacement noise, jumps and the solver's own noise).
      solver, steps, grid, **solver_args: as in :func:`difflax.sample` (grid default: the solver's).
      jump_length, resample: RePaint's ``j`` and ``r`` (static ints; ``resample = 1``: plain replacement).
      return_trajectory: also return ``info["trajectory"]`` (the sample after every move,
        starting with ``x_T`` and ending with the output) and ``info["trajectory_t"]``
        (their times; the final denoising step has time 0).

    Returns ``(x0, info)`` with ``info["nfe"]``.
    """
    _check_positive_int(jump_length, "jump_length")
    _check_positive_int(resample, "resample")
    x_T = jnp.asarray(x_T)
    m = _prepare_mask(mask, known, x_T.shape)
    known = jnp.broadcast_to(jnp.asarray(known, x_T.dtype), x_T.shape)
    _, solver, ts, final_zero = _setup_solver(solver, solver_args, process, steps, grid)
    positive = ts[:-1] if final_zero else ts
    num_moves_down = positive.shape[0] - 1
    moves = np.asarray(_repaint_moves(num_moves_down, jump_length, resample), dtype=np.int32).reshape(-1, 2)
    has_jumps = bool(np.any(moves[:, 1] < moves[:, 0]))
    key, solver_key, noise_key = jax.random.split(key, 3)
    num_steps = ts.shape[0] - 1
    state = solver.init(process, x_T, solver_key if solver.stochastic else None, num_steps)

    def down(state, t, t_next, k):
        state = solver.step(denoise, process, state, t, t_next)
        alpha, sigma = process.alpha_sigma(t_next)
        noisy_known = alpha * known + sigma * jax.random.normal(k, known.shape, known.dtype)
        return state.replace(x=jnp.where(m, noisy_known, state.x))

    def up(state, t, t_next, k):
        x = _forward_transition(process, state.x, t, t_next, k)
        fresh = solver.init(process, x, state.key, num_steps)
        return fresh.replace(nfe=state.nfe, step=state.step)

    def body(carry, move):
        state, k = carry
        k, sub = jax.random.split(k)
        t, t_next = positive[move[0]], positive[move[1]]
        if has_jumps:
            state = jax.lax.cond(move[1] > move[0], down, up, state, t, t_next, sub)
        else:
            state = down(state, t, t_next, sub)
        return (state, k), ((state.x, t_next) if return_trajectory else None)

    (state, _), traj = jax.lax.scan(body, (state, noise_key), jnp.asarray(moves))
    x, nfe = state.x, state.nfe
    if final_zero:
        x = call(denoise, x, positive[-1])
        nfe = nfe + 1
    x = jnp.where(m, known, x)
    info = {"nfe": nfe, "steps": num_steps, "ts": ts, "moves": moves}
    if return_trajectory:
        xs, tt = traj
        end_t = jnp.zeros((1,), tt.dtype) if final_zero else tt[-1:]
        info["trajectory"] = jnp.concatenate([x_T[None], xs, x[None]])
        info["trajectory_t"] = jnp.concatenate([positive[:1].astype(tt.dtype), tt, end_t])
    return x, info


def sdedit(
    denoise: Denoiser,
    process: Process,
    x_init: Array,
    t_start,
    key: Array,
    *,
    solver="ddpm",
    steps: int = 20,
    grid=None,
    return_trajectory: bool = False,
    **solver_args,
):
    r"""SDEdit (Meng et al. 2022, "SDEdit: guided image synthesis and editing with stochastic
    differential equations"): noise ``x_init`` to ``t_start`` with the forward marginal,
    ``x = alpha(t_start) x_init + sigma(t_start) z``, and solve from ``t_start`` down to the
    data on a grid restricted to ``[t_min, t_start]`` (the named grid of ``process`` with
    ``t_max = t_start``), with ``steps`` steps. Small ``t_start`` stays faithful to
    ``x_init``, large ``t_start`` (the paper: ``t0`` in ``[0.3, 0.6]`` of the VP range)
    gives realism. ``t_start`` may be traced. Returns :func:`difflax.sample`'s ``(x0, info)``.
    """
    check_t(t_start, process.t_min, process.t_max, name="t_start")
    if isinstance(solver, str):
        name = solver
    else:
        name = type(solver).__name__.lower()
    if grid is None:
        grid = DEFAULT_GRIDS.get(name, "logsnr")
    if not isinstance(grid, str):
        raise ValueError(f"grid must be a grid name for sdedit (it is restricted to [t_min, t_start]); got {grid!r}.")
    x_init = jnp.asarray(x_init)
    k_noise, k_solver = jax.random.split(key)
    t0 = jnp.asarray(t_start, dtype=jnp.result_type(x_init, float))
    x = process.marginal(x_init, t0, jax.random.normal(k_noise, x_init.shape, x_init.dtype))
    restricted = dataclasses.replace(process, t_max=t0)
    ts = make_grid(grid, restricted, steps, final_zero=True)
    return sample(
        denoise, process, x, solver=solver, steps=steps, grid=ts, key=k_solver, final_zero=True,
        return_trajectory=return_trajectory, **solver_args,
    )


# ----------------------------------------------------------------------------------------------
# Linear inverse problems.


class LinearOperator(NamedTuple):
    """A linear measurement operator ``A`` acting on a batch ``(B, ...)``.

    Attributes:
      forward: ``x -> A x``.
      transpose: ``y -> A^T y`` (``None``: derived with ``jax.linear_transpose``).
      pinv: ``y -> A^+ y``, the Moore-Penrose pseudoinverse (needed by noiseless :func:`pigdm`).
      gram_solve: ``(v, a, b) -> (a A A^T + b I)^{-1} v`` with ``a, b`` broadcastable
        (``None``: conjugate gradients).
    """

    forward: Callable
    transpose: Callable | None = None
    pinv: Callable | None = None
    gram_solve: Callable | None = None


def mask_operator(mask) -> LinearOperator:
    """Inpainting: ``A x = m * x`` (same shape, zeros off the mask); ``A = A^T = A^+`` is a projection."""
    mask = jnp.asarray(mask)

    def forward(x):
        m = _prepare_mask(mask, jnp.zeros((), x.dtype), x.shape)
        return jnp.where(m, x, jnp.zeros((), x.dtype))

    def gram_solve(v, a, b):  # A A^T = diag(m)
        m = _prepare_mask(mask, jnp.zeros((), v.dtype), v.shape)
        return jnp.where(m, v / (a + b), v / b)

    return LinearOperator(forward, forward, forward, gram_solve)


def _check_factor(x, factor):
    if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
        raise ValueError(
            f"superres_operator(factor={factor}) needs images (B, H, W, C) with H and W divisible by "
            f"the factor; got shape {x.shape}."
        )


def superres_operator(factor: int) -> LinearOperator:
    """Super-resolution: ``A`` = ``factor x factor`` average pooling of images ``(B, H, W, C)``.

    ``A^T y`` is nearest upsampling divided by ``factor^2``, ``A A^T = I / factor^2``, and
    ``A^+ = factor^2 A^T`` is nearest upsampling.
    """
    _check_positive_int(factor, "factor")
    f = int(factor)

    def forward(x):
        _check_factor(x, f)
        b, h, w, c = x.shape
        return x.reshape(b, h // f, f, w // f, f, c).mean(axis=(2, 4))

    def pinv(y):
        return jnp.repeat(jnp.repeat(y, f, axis=1), f, axis=2)

    return LinearOperator(
        forward, lambda y: pinv(y) / f**2, pinv, lambda v, a, b: v / (a / f**2 + b)
    )


def blur_operator(kernel, *, rcond: float = 1e-6) -> LinearOperator:
    """Deblurring: ``A`` = circular (periodic) convolution of images ``(B, H, W, C)`` with ``kernel``.

    ``kernel`` has shape ``(kh, kw)``, its centre at ``(kh // 2, kw // 2)``, and is applied
    to every channel. Being circular, ``A`` is diagonal in the 2-D Fourier basis,
    ``A = F^{-1} diag(K) F``: ``A^T`` uses ``conj(K)``, ``A^+`` uses ``conj(K) / |K|^2``
    where ``|K| > rcond max|K|`` (else 0), and the Gram solves are exact.
    """
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 2:
        raise ValueError(f"kernel must have shape (kh, kw); got {kernel.shape}.")

    def spectrum(x):
        if x.ndim != 4 or x.shape[1] < kernel.shape[0] or x.shape[2] < kernel.shape[1]:
            raise ValueError(f"blur_operator needs images (B, H, W, C) at least as large as the kernel "
                             f"{kernel.shape}; got shape {x.shape}.")
        h, w = x.shape[1], x.shape[2]
        k = jnp.zeros((h, w), x.dtype).at[: kernel.shape[0], : kernel.shape[1]].set(kernel.astype(x.dtype))
        k = jnp.roll(k, (-(kernel.shape[0] // 2), -(kernel.shape[1] // 2)), axis=(0, 1))
        return jnp.fft.fft2(k)[None, :, :, None]

    def apply(x, diag):
        return jnp.real(jnp.fft.ifft2(jnp.fft.fft2(x, axes=(1, 2)) * diag, axes=(1, 2))).astype(x.dtype)

    def forward(x):
        return apply(x, spectrum(x))

    def transpose(y):
        return apply(y, jnp.conj(spectrum(y)))

    def pinv(y):
        k = spectrum(y)
        k2 = jnp.abs(k) ** 2
        keep = jnp.abs(k) > rcond * jnp.max(jnp.abs(k))
        return apply(y, jnp.where(keep, jnp.conj(k) / jnp.where(keep, k2, 1.0), 0.0))

    def gram_solve(v, a, b):
        k2 = jnp.abs(spectrum(v)) ** 2
        a = jnp.asarray(a).reshape(jnp.shape(a) + (1,) * (v.ndim - jnp.ndim(a)))
        b = jnp.asarray(b).reshape(jnp.shape(b) + (1,) * (v.ndim - jnp.ndim(b)))
        return jnp.real(jnp.fft.ifft2(jnp.fft.fft2(v, axes=(1, 2)) / (a * k2 + b), axes=(1, 2))).astype(v.dtype)

    return LinearOperator(forward, transpose, pinv, gram_solve)


def _as_operator(operator) -> LinearOperator:
    if isinstance(operator, LinearOperator):
        return operator
    if callable(operator):
        return LinearOperator(operator)
    raise TypeError(f"operator must be a LinearOperator or a function x -> A x; got {type(operator).__name__}.")


def dps_sample(
    denoise: Denoiser,
    process: Process,
    x_T: Array,
    measurement: Array,
    operator,
    key: Array | None = None,
    *,
    zeta=1.0,
    solver="ddpm",
    steps: int = 100,
    grid=None,
    return_trajectory: bool = False,
    **solver_args,
):
    r"""Diffusion posterior sampling (Chung et al. 2023, "Diffusion posterior sampling for general
    noisy inverse problems", alg. 1) for ``y = A(x0) + noise``.

    Each step evaluates ``x0_hat = D(x_i, t_i)`` and, by reverse-mode through the
    denoiser, ``grad_{x_i} ||y - A(x0_hat)||^2``; takes the solver's step from
    ``x0_hat`` to ``x'_{i-1}``; and corrects it,

        x_{i-1} = x'_{i-1} - zeta_i grad_{x_i} ||y - A(x0_hat(x_i))||^2,
        zeta_i = zeta / ||y - A(x0_hat(x_i))||          (per example; the paper's step size),

    ending with the denoising step ``D(x, t_min)``. ``A`` is any differentiable function
    (or a :class:`LinearOperator`); it need not be linear. The solver must evaluate the
    denoiser once per step at the current point (``"ddpm"``, the paper's, ``"ddim"``,
    ``"euler"``): its evaluation and the gradient share one forward pass. DPS is an
    approximation (``p(y | x_t) ~ p(y | x0_hat)``) with a tuned ``zeta``; the paper uses
    ``zeta`` between 0.1 and 1 for images. ``zeta`` may be traced.
    """
    a_fn = _as_operator(operator).forward
    name, solver, ts, final_zero = _setup_solver(solver, solver_args, process, steps, grid)
    if name not in SINGLE_CALL_SOLVERS:
        raise ValueError(f"solver {name!r} cannot be used by dps_sample; expected one of "
                         f"{', '.join(map(repr, SINGLE_CALL_SOLVERS))} (one denoiser call per step).")
    if solver.stochastic and key is None:
        raise ValueError(f"solver {name!r} is stochastic with these settings; pass key=jax.random.key(...).")
    x_T = jnp.asarray(x_T)
    y = jnp.asarray(measurement)
    positive = ts[:-1] if final_zero else ts
    num_steps = ts.shape[0] - 1
    state = solver.init(process, x_T, key, num_steps)

    def body(state, times):
        t, t_next = times

        def sq_residual(z):
            x0 = denoise(z, time_vector(t, z))
            r = y - a_fn(x0)
            return jnp.sum(r**2), (x0, r)

        (_, (x0, r)), grad = jax.value_and_grad(sq_residual, has_aux=True)(state.x)
        norm = jnp.sqrt(jnp.sum(r**2, axis=_batch_axes(r)))
        step_size = _per_example(zeta / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny), grad)
        state = solver.step(lambda *_: x0, process, state, t, t_next)
        state = state.replace(x=state.x - step_size * grad)
        return state, (state.x if return_trajectory else None)

    state, traj = jax.lax.scan(body, state, (positive[:-1], positive[1:]))
    return finish(denoise, state, x_T, traj, ts, final_zero=final_zero)


def pigdm(
    denoise: Denoiser,
    process: Process,
    measurement: Array,
    operator,
    *,
    scale=1.0,
    sigma_y=0.0,
    data_var=1.0,
    covariance: str = "isotropic",
    form: str = "score",
    cg_iters: int = 50,
    cg_tol: float = 1e-6,
) -> Denoiser:
    r"""Pseudoinverse-guided diffusion (Song et al. 2023, "Pseudoinverse-guided diffusion models
    for inverse problems") for linear ``y = A x0 + sigma_y n``, as a denoiser transform.

    ``p(x0 | x_t)`` is approximated by a Gaussian ``N(x0_hat, Sigma_t)``, so
    ``p(y | x_t) ~ N(A x0_hat, A Sigma_t A^T + sigma_y^2 I)`` and (paper sec. 3)

        g = grad_{x_t} log p(y | x_t) ~ J^T A^T (A Sigma_t A^T + sigma_y^2 I)^{-1} (y - A x0_hat),

    ``J = d x0_hat / d x_t`` applied by reverse mode through the denoiser. ``g`` is added to
    the score with weight ``scale`` (``form`` as in :func:`classifier_guidance`). The
    covariance is

    * ``"isotropic"`` (Pi-GDM): ``Sigma_t = r_t^2 I`` with ``r_t^2 = v sigma^2 / (sigma^2 +
      alpha^2 v)``, the posterior variance for data of variance ``v = data_var`` (the
      paper's ``sigma_t^2 / (1 + sigma_t^2)`` is ``v = 1``). Noiseless (``sigma_y = 0``) this is
      ``g = J^T A^+ (y - A x0_hat) / r_t^2`` (the paper's noiseless case) with the pseudoinverse ``A^+``
      (the operator must carry ``pinv``); otherwise the Gram system is solved by
      ``operator.gram_solve`` or by ``cg_iters`` steps of conjugate gradients (relative tolerance ``cg_tol``).
    * ``"tweedie"``: ``Sigma_t = Cov[x0 | x_t] = (sigma^2 / alpha) J``, the second-order
      Tweedie formula (as in Boys et al. 2023, "Tweedie moment projected diffusions for
      inverse problems"); the system is solved by conjugate gradients whose matrix-vector
      products are Jacobian-vector products of the denoiser (``jax.linearize``: one
      linearization, ``cg_iters`` linear applications per evaluation). The CG runs on the
      whole batch at once (the system is block diagonal).

    With the exact denoiser and ``scale = 1`` both are exact for Gaussian data
    (``"isotropic"`` when its covariance is ``v I``, ``"tweedie"`` for any covariance):
    the guided denoiser is ``E[x0 | x_t, y]`` and sampling draws ``p(x0 | y)``. The paper
    instead adds ``sqrt(alpha_bar_t) g`` to the DDIM update with a tuned weight, which
    differs from this score form by a per-step factor (absorbed into ``scale``).
    ``operator`` is a :class:`LinearOperator` or a linear function (``A^T`` then comes from
    ``jax.linear_transpose``).
    """
    _check_choice(form, FORMS, "form")
    _check_choice(covariance, COVARIANCES, "covariance")
    op = _as_operator(operator)
    y = jnp.asarray(measurement)
    sy = _concrete_float(sigma_y)
    noiseless = sy is not None and sy == 0.0
    if covariance == "isotropic" and noiseless and op.pinv is None:
        raise ValueError("pigdm with sigma_y=0 needs the pseudoinverse: pass a LinearOperator with pinv.")

    def transpose(u, x0):
        return op.transpose(u) if op.transpose is not None else jax.linear_transpose(op.forward, x0)(u)[0]

    def guided(x, t):
        alpha, sigma = process.alpha_sigma(t)
        alpha = jnp.broadcast_to(alpha, (x.shape[0],))
        sigma = jnp.broadcast_to(sigma, (x.shape[0],))
        b = jnp.asarray(sigma_y, x.dtype) ** 2
        if covariance == "tweedie":
            x0, jac = jax.linearize(lambda z: denoise(z, t), x)
            jac_t = jax.linear_transpose(jac, x)
            res = y - op.forward(x0)
            c = broadcast_to(sigma**2 / alpha, x0)

            def matvec(w):
                return op.forward(c * jac(transpose(w, x0))) + b * w

            u, _ = jax.scipy.sparse.linalg.cg(matvec, res, tol=cg_tol, maxiter=cg_iters)
            (grad,) = jac_t(transpose(u, x0).astype(x0.dtype))
            return _add_score(x0, grad, scale, form, x, t, process)
        x0, vjp = jax.vjp(lambda z: denoise(z, t), x)
        r2 = data_var * sigma**2 / (sigma**2 + alpha**2 * data_var)
        res = y - op.forward(x0)
        if noiseless:
            v = op.pinv(res) / broadcast_to(r2, x0)
        else:
            a = broadcast_to(r2, res)
            if op.gram_solve is not None:
                u = op.gram_solve(res, a, b)
            else:
                u, _ = jax.scipy.sparse.linalg.cg(
                    lambda w: a * op.forward(transpose(w, x0)) + b * w, res, tol=cg_tol, maxiter=cg_iters
                )
            v = transpose(u, x0)
        (grad,) = vjp(v.astype(x0.dtype))
        return _add_score(x0, grad, scale, form, x, t, process)

    return guided
