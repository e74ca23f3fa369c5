r"""Classifier guidance (Dhariwal & Nichol 2021) and universal guidance (Bansal et al. 2023).

Both add the gradient ``g`` of a log-probability to the score of an unconditional
denoiser and map back to x0 by Tweedie's formula, ``x0 = (x_t + sigma^2 score) / alpha``:

    score_guided = score + s g,    g = grad_{x_t} log p(y | x_t),

by Bayes' rule the score of ``p(x_t) p(y | x_t)^s``. Classifier guidance takes ``g``
from a noise-conditional classifier (trained with
:func:`difflax.losses.noisy_classifier_loss`); universal guidance from a clean-data
model applied to the prediction ``x0_hat(x_t)``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from difflax.checks import check_choice
from difflax.parametrization import Denoiser, convert
from difflax.processes import Process, broadcast_to

FORMS = ("score", "eps")

__all__ = ["FORMS", "classifier_guidance", "classifier_log_prob", "universal_guidance"]


def add_score(x0, grad, scale, form, x, t, process):
    """The x0 of ``score + scale * grad`` (``form="score"``) or ``eps - scale * sigma * grad`` (``"eps"``).

    ``x0`` is the unguided prediction at ``(x, t)`` and ``grad`` a gradient of a
    log-probability in ``x``; the guided score or eps is mapped back by Tweedie's formula.
    """
    alpha, sigma = (broadcast_to(c, x) for c in process.alpha_sigma(t))
    s = broadcast_to(scale, x)
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
    check_choice(form, FORMS, "form")

    def guided(x, t):
        x0 = denoise(x, t)
        grad = jax.grad(lambda z: jnp.sum(log_prob_fn(z, t)))(x)
        return add_score(x0, grad, scale, form, x, t, process)

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
    check_choice(form, FORMS, "form")

    def guided(x, t):
        x0, vjp = jax.vjp(lambda z: denoise(z, t), x)
        g0 = jax.grad(lambda u: jnp.sum(log_prob_fn(u)))(x0)
        (grad,) = vjp(g0)
        return add_score(x0, grad, scale, form, x, t, process)

    return guided
