"""Fréchet distance between Gaussian feature statistics (the "F" in FID).

For ``N(mu1, S1)`` and ``N(mu2, S2)`` the squared 2-Wasserstein (Fréchet) distance is
(Dowson & Landau 1982; Heusel et al. 2017, "GANs trained by a two time-scale update
rule converge to a local Nash equilibrium")

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^{1/2} S2 S1^{1/2})^{1/2}).

The usual FID code (TTUR, pytorch-fid) evaluates the last trace as
``tr(scipy.linalg.sqrtm(S1 @ S2))``: a Schur-based square root of a non-symmetric
product, which returns complex values or NaNs for rank-deficient covariances (FID's
2048-d features with fewer samples) and needs an ``eps * I`` retry. Here the product is
symmetrized instead:

1. ``S1 = U diag(l) U^T`` (``eigh``; tiny negative round-off eigenvalues clipped to 0),
   so ``S1^{1/2} = U diag(sqrt(l)) U^T`` is symmetric PSD;
2. ``M = S1^{1/2} S2 S1^{1/2}`` is symmetric PSD, with the same non-zero eigenvalues as
   ``S1 S2`` (``AB`` and ``BA`` share them, ``A = S1^{1/2}``, ``B = S1^{1/2} S2``);
3. ``tr(M^{1/2}) = sum_i sqrt(max(eig_i(M), 0))``, from ``eigvalsh``.

Every step is a symmetric eigenproblem, so it is backward stable and needs no
regularizing offset. The computation is host-side numpy in float64: the matrices are
small (at most ``2048 x 2048``), it happens once per evaluation, and float64 keeps
``d^2`` (a difference of traces of size ``~ tr(S)``) accurate whatever the device's x64
setting.
"""

from __future__ import annotations

import numpy as np

__all__ = ["frechet_distance", "sqrtm_psd", "trace_sqrt_product"]


def _as_cov(name, s):
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"{name} must be a square (D, D) covariance matrix; got shape {s.shape}.")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name} contains non-finite values.")
    return 0.5 * (s + s.T)


def sqrtm_psd(s) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix, via ``eigh`` in float64.

    Eigenvalues below zero (round-off of a PSD matrix) are clipped to zero.
    """
    s = _as_cov("s", s)
    lam, vecs = np.linalg.eigh(s)
    return (vecs * np.sqrt(np.clip(lam, 0.0, None))) @ vecs.T


def trace_sqrt_product(sigma1, sigma2) -> float:
    """``tr((S1^{1/2} S2 S1^{1/2})^{1/2}) = tr(sqrtm(S1 S2))`` for symmetric PSD ``S1, S2``."""
    s1 = _as_cov("sigma1", sigma1)
    s2 = _as_cov("sigma2", sigma2)
    if s1.shape != s2.shape:
        raise ValueError(f"sigma1 and sigma2 must have the same shape; got {s1.shape} and {s2.shape}.")
    root = sqrtm_psd(s1)
    m = root @ s2 @ root
    eig = np.linalg.eigvalsh(0.5 * (m + m.T))
    return float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Fréchet distance ``d^2`` between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    This is the number FID reports (FID is ``d^2``, not ``d``). Inputs may be numpy or
    jax arrays of any float dtype; the computation is float64 numpy. The result is
    clipped at 0 (``d^2 >= 0`` exactly; identical statistics give ``0.0``).

    Args:
      mu1, mu2: ``(D,)`` means.
      sigma1, sigma2: ``(D, D)`` symmetric PSD covariances.

    Returns:
      ``d^2`` as a Python float.
    """
    mu1 = np.asarray(mu1, dtype=np.float64)
    mu2 = np.asarray(mu2, dtype=np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must be (D,) vectors of equal length; got {mu1.shape} and {mu2.shape}.")
    s1 = _as_cov("sigma1", sigma1)
    s2 = _as_cov("sigma2", sigma2)
    if s1.shape != (mu1.shape[0],) * 2 or s2.shape != s1.shape:
        raise ValueError(
            f"covariances must have shape ({mu1.shape[0]}, {mu1.shape[0]}) to match the means; "
            f"got {s1.shape} and {s2.shape}."
        )
    diff = mu1 - mu2
    d2 = float(diff @ diff) + float(np.trace(s1)) + float(np.trace(s2)) - 2.0 * trace_sqrt_product(s1, s2)
    return max(d2, 0.0)
