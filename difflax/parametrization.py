"""Conversions between what a network predicts, and the denoiser contract.

For ``x_t = alpha x0 + sigma eps`` a network may predict

* ``"eps"``: the noise ``eps`` (Ho et al. 2020),
* ``"x0"``: the clean data,
* ``"v"``: ``v = alpha_hat eps - sigma_hat x0`` (Salimans & Ho 2022), where
  ``(alpha_hat, sigma_hat) = (alpha, sigma) / sqrt(alpha^2 + sigma^2)``; for VP
  processes this is exactly their ``v``, for others it is the ``v`` of the
  variance-normalized ``x_t / sqrt(alpha^2 + sigma^2)``,
* ``"score"``: ``grad log p_t(x_t) = -eps / sigma`` (Tweedie; Song & Ermon 2019),
* ``"velocity"``: the flow ``u = alpha' x0 + sigma' eps`` (Lipman et al. 2023; Liu et
  al. 2023), which for every process equals the probability-flow ODE drift.

All five are linear in ``(x_t, x0, eps)``. :func:`convert` maps a prediction to the
pair ``(x0, eps)`` with no division by a coefficient that can vanish for that
prediction, then to the requested target, so conversions are exact for every
process (up to rounding).

:func:`as_denoiser` turns any network into the denoiser of the design,
``denoise(x_t, t) -> E[x0 | x_t]``; ``prediction="edm"`` applies the EDM
preconditioning of Karras et al. 2022 (table 1).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from difflax.checks import check_choice
from difflax.processes import Process, broadcast_to, once_per_batch

Array = jax.Array
Denoiser = Callable[[Array, Array], Array]

PREDICTIONS = ("eps", "x0", "v", "score", "velocity")
PRECONDITIONINGS = ("edm", "vp", "ve")

__all__ = [
    "PREDICTIONS",
    "Denoiser",
    "as_denoiser",
    "check_prediction",
    "convert",
    "denoiser_to",
    "edm_preconditioning",
    "from_pair",
    "from_x0",
    "network_input",
    "preconditioning",
    "to_x0",
]


def check_prediction(prediction: str, allowed=PREDICTIONS, name: str = "prediction") -> str:
    """``prediction`` if it is one of ``allowed`` (the predictions above); else a ``ValueError`` listing them."""
    return check_choice(prediction, allowed, name)


def _needs_derivatives(d_alpha, d_sigma):
    if d_alpha is None or d_sigma is None:
        raise ValueError(
            "prediction 'velocity' needs d_alpha and d_sigma (the time derivatives of alpha and sigma); "
            "get them from process.alpha_sigma_derivatives(t)."
        )


def _to_pair(pred, prediction, x_t, alpha, sigma, d_alpha, d_sigma):
    """``(x0, eps)`` implied by ``pred`` at ``x_t``."""
    if prediction == "eps":
        return (x_t - sigma * pred) / alpha, pred
    if prediction == "x0":
        return pred, (x_t - alpha * pred) / sigma
    if prediction == "v":
        norm = jnp.sqrt(alpha**2 + sigma**2)
        a, s = alpha / norm, sigma / norm
        x_hat = x_t / norm
        return a * x_hat - s * pred, s * x_hat + a * pred
    if prediction == "score":
        return (x_t + sigma**2 * pred) / alpha, -sigma * pred
    _needs_derivatives(d_alpha, d_sigma)
    det = alpha * d_sigma - sigma * d_alpha
    return (d_sigma * x_t - sigma * pred) / det, (alpha * pred - d_alpha * x_t) / det


def from_pair(x0, eps, prediction, alpha, sigma, d_alpha=None, d_sigma=None):
    """The ``prediction`` target of a known pair ``(x0, eps)``, with no division by ``sigma`` or ``alpha``."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        norm = jnp.sqrt(alpha**2 + sigma**2)
        return (alpha * eps - sigma * x0) / norm
    if prediction == "score":
        return -eps / sigma
    _needs_derivatives(d_alpha, d_sigma)
    return d_alpha * x0 + d_sigma * eps


def convert(pred, source: str, target: str, x_t, alpha, sigma, d_alpha=None, d_sigma=None):
    """Convert a ``source`` prediction at ``x_t`` into the ``target`` parametrization.

    ``alpha``, ``sigma`` (and for ``"velocity"`` their time derivatives) must broadcast
    against ``x_t``; see :func:`difflax.processes.broadcast_to`.
    """
    check_prediction(source, name="source")
    check_prediction(target, name="target")
    if source == target:
        return pred
    x0, eps = _to_pair(pred, source, x_t, alpha, sigma, d_alpha, d_sigma)
    return from_pair(x0, eps, target, alpha, sigma, d_alpha, d_sigma)


def to_x0(pred, prediction, x_t, alpha, sigma, d_alpha=None, d_sigma=None):
    """``x0`` implied by a ``prediction``: shorthand for ``convert(pred, prediction, "x0", ...)``."""
    return convert(pred, prediction, "x0", x_t, alpha, sigma, d_alpha, d_sigma)


def from_x0(x0, prediction, x_t, alpha, sigma, d_alpha=None, d_sigma=None):
    """The ``prediction`` target implied by ``x0`` at ``x_t``."""
    return convert(x0, "x0", prediction, x_t, alpha, sigma, d_alpha, d_sigma)


def edm_preconditioning(sigma, sigma_data=0.5):
    """EDM preconditioning (Karras et al. 2022, table 1, "ours").

    ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
    ``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_noise = ln(sigma) / 4``; the denoiser is
    ``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)``.
    """
    return preconditioning("edm", sigma, sigma_data)


def preconditioning(kind: str, sigma, sigma_data=0.5, *, beta_d=19.9, beta_min=0.1, num_steps=1000):
    """``(c_skip, c_out, c_in, c_noise)`` of Karras et al. 2022, table 1.

    ``kind="edm"``: the EDM column (above). ``kind="vp"``: ``c_skip = 1``,
    ``c_out = -sigma``, ``c_in = 1/sqrt(sigma^2 + 1)``, ``c_noise = (M - 1) sigma^{-1}(sigma)``
    with the VP schedule ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)`` and ``M``
    steps. ``kind="ve"``: ``c_skip = 1``, ``c_out = sigma``, ``c_in = 1``,
    ``c_noise = ln(sigma / 2)``. ``sigma`` is the noise level of the scaled variable
    ``x_t / alpha``, i.e. ``sigma / alpha`` of the process.
    """
    check_choice(kind, PRECONDITIONINGS, "preconditioning")
    sigma = jnp.asarray(sigma, dtype=jnp.result_type(sigma, float))
    if kind == "edm":
        total = sigma**2 + sigma_data**2
        return sigma_data**2 / total, sigma * sigma_data / jnp.sqrt(total), 1.0 / jnp.sqrt(total), jnp.log(sigma) / 4.0
    one = jnp.ones_like(sigma)
    if kind == "vp":
        t = (jnp.sqrt(beta_min**2 + 2.0 * beta_d * jnp.log1p(sigma**2)) - beta_min) / beta_d
        return one, -sigma, 1.0 / jnp.sqrt(sigma**2 + 1.0), (num_steps - 1) * t
    return one, sigma, one, jnp.log(0.5 * sigma)


def _coefficients(process: Process, t, x_t, derivatives: bool):
    """``(alpha, sigma, d_alpha, d_sigma)`` at ``t`` broadcast against ``x_t``; the derivatives only if asked.

    Computed once for a time shared by the batch (:func:`difflax.processes.once_per_batch`).
    """

    def at(t):
        return (*process.alpha_sigma(t), *(process.alpha_sigma_derivatives(t) if derivatives else ()))

    coefs = [broadcast_to(c, x_t) for c in once_per_batch(at, t)]
    return (*coefs, None, None) if not derivatives else tuple(coefs)


def as_denoiser(
    apply_fn: Callable, process: Process, prediction: str = "eps", *, sigma_data: float | None = None
) -> Denoiser:
    """Wrap a network ``apply_fn(x_t, t)`` into ``denoise(x_t, t) -> x0_hat``.

    ``prediction`` names what the network outputs: one of ``"eps"``, ``"x0"``, ``"v"``,
    ``"score"``, ``"velocity"``; or ``"edm"``, in which case the network is the raw
    ``F`` of Karras et al. 2022 and is called as ``apply_fn(c_in x_t / alpha, c_noise)``
    with the EDM preconditioning at ``sigma / alpha`` (``sigma_data`` defaults to the
    process's own, else 0.5). Other conditioning (labels, text) is closed over by
    ``apply_fn``.
    """
    check_prediction(prediction, (*PREDICTIONS, "edm"))
    if prediction == "edm":
        scaling = _edm_scaling(process, sigma_data)

        def denoise_edm(x_t, t):
            alpha, c_skip, c_out, c_in, c_noise = once_per_batch(scaling, t)
            x_scaled = x_t / broadcast_to(alpha, x_t)
            out = apply_fn(broadcast_to(c_in, x_t) * x_scaled, c_noise)
            return broadcast_to(c_skip, x_t) * x_scaled + broadcast_to(c_out, x_t) * out

        return denoise_edm

    def denoise(x_t, t):
        out = apply_fn(x_t, t)
        if out.shape != x_t.shape:
            raise ValueError(f"apply_fn must return an array of the shape of x_t {x_t.shape}; got {out.shape}.")
        if prediction == "x0":
            return out
        return to_x0(out, prediction, x_t, *_coefficients(process, t, x_t, prediction == "velocity"))

    return denoise


def _edm_scaling(process: Process, sigma_data: float | None):
    """``t -> (alpha, c_skip, c_out, c_in, c_noise)``: EDM's preconditioning at ``sigma / alpha``
    (``sigma_data`` defaults to the process's own, else 0.5)."""
    sd = sigma_data if sigma_data is not None else getattr(process, "sigma_data", 0.5)

    def scaling(t):
        alpha, sigma = process.alpha_sigma(t)
        return alpha, *edm_preconditioning(sigma / alpha, sd)

    return scaling


def network_input(process: Process, prediction: str = "eps", *, sigma_data: float | None = None):
    """``(x_t, t) -> (x, noise)``: what :func:`as_denoiser` feeds its network, ``apply_fn(x, noise)``.

    ``(x_t, t)`` itself, or for ``prediction="edm"`` the preconditioned ``(c_in x_t / alpha, c_noise)``.
    Used to read a network's inner features at the input its denoiser gives it (the discriminator
    head of DMD2 sits on the fake denoiser's features).
    """
    check_prediction(prediction, (*PREDICTIONS, "edm"))
    if prediction != "edm":
        return lambda x_t, t: (x_t, t)
    scaling = _edm_scaling(process, sigma_data)

    def edm_input(x_t, t):
        alpha, _, _, c_in, c_noise = once_per_batch(scaling, t)
        return broadcast_to(c_in, x_t) * (x_t / broadcast_to(alpha, x_t)), c_noise

    return edm_input


def denoiser_to(denoise: Denoiser, process: Process, target: str) -> Callable[[Array, Array], Array]:
    """The inverse of :func:`as_denoiser`: read a denoiser as an eps, v, score or velocity model."""
    check_prediction(target, name="target")

    def model(x_t, t):
        return from_x0(denoise(x_t, t), target, x_t, *_coefficients(process, t, x_t, target == "velocity"))

    return model
