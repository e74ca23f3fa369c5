r"""Linear inverse problems ``y = A x0 + sigma_y n``: measurement operators and Pi-GDM guidance.

A :class:`LinearOperator` carries ``A`` and what the guidance needs of it (``A^T``,
the pseudoinverse ``A^+``, solves with ``a A A^T + b I``); :func:`mask_operator`
(inpainting), :func:`superres_operator` (average pooling) and :func:`blur_operator`
(circular convolution) give them in closed form. :func:`pigdm` (Song et al. 2023) turns
an unconditional denoiser into one for ``p(x0 | y)`` by adding the score of the Gaussian
approximation ``p(y | x_t) ~ N(A x0_hat, A Sigma_t A^T + sigma_y^2 I)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from difflax.checks import check_choice, check_positive_int, concrete_float
from difflax.guidance.classifier import FORMS, add_score
from difflax.guidance.constraints import prepare_mask
from difflax.parametrization import Denoiser
from difflax.processes import Process, broadcast_to

Array = jax.Array

COVARIANCES = ("isotropic", "tweedie")

__all__ = ["COVARIANCES", "LinearOperator", "blur_operator", "mask_operator", "pigdm", "superres_operator"]


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
        m = prepare_mask(mask, x.shape)
        return jnp.where(m, x, jnp.zeros((), x.dtype))

    def gram_solve(v, a, b):  # A A^T = diag(m)
        m = prepare_mask(mask, v.shape)
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
    f = check_positive_int(factor, "factor")

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
        a, b = broadcast_to(a, v), broadcast_to(b, v)
        return jnp.real(jnp.fft.ifft2(jnp.fft.fft2(v, axes=(1, 2)) / (a * k2 + b), axes=(1, 2))).astype(v.dtype)

    return LinearOperator(forward, transpose, pinv, gram_solve)


def as_operator(operator) -> LinearOperator:
    """``operator`` as a :class:`LinearOperator`; a function ``x -> A x`` becomes its ``forward``."""
    if isinstance(operator, LinearOperator):
        return operator
    if callable(operator):
        return LinearOperator(operator)
    raise TypeError(f"operator must be a LinearOperator or a function x -> A x; got {type(operator).__name__}.")



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
    check_choice(form, FORMS, "form")
    check_choice(covariance, COVARIANCES, "covariance")
    op = as_operator(operator)
    y = jnp.asarray(measurement)
    sy = concrete_float(sigma_y)
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
            return add_score(x0, grad, scale, form, x, t, process)
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
        return add_score(x0, grad, scale, form, x, t, process)

    return guided
