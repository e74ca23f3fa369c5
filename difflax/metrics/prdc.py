"""Precision, recall, density and coverage of generated samples, from k-NN manifolds.

Each real sample ``r_i`` gets the ball ``B(r_i, rho_k(r_i))`` whose radius is the distance
to its ``k``-th nearest other real sample (fakes ``f_j`` likewise, ``rho_k(f_j)``). With
``N`` real and ``M`` fake samples (Kynkäänniemi et al. 2019, "Improved precision and
recall metric for assessing generative models"; Naeem et al. 2020, "Reliable fidelity and
diversity metrics for generative models"):

    precision = 1/M sum_j 1[exists i: |f_j - r_i| < rho_k(r_i)]      (fakes on the real manifold)
    recall    = 1/N sum_i 1[exists j: |r_i - f_j| < rho_k(f_j)]      (reals on the fake manifold)
    density   = 1/(k M) sum_j sum_i 1[|f_j - r_i| < rho_k(r_i)]      (can exceed 1)
    coverage  = 1/N sum_i 1[min_j |r_i - f_j| < rho_k(r_i)]

Strict inequalities and ``k = 5`` follow Naeem et al.'s reference code. Distances use
the Gram form in row chunks of ``chunk_size`` (memory ``chunk_size x max(N, M)``), all
inside one ``jit``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from difflax.metrics.distances import _float, kth_nearest_distance, map_row_chunks, sq_distances_gram

__all__ = ["prdc"]


def prdc(real_features, fake_features, k: int = 5, chunk_size: int = 1024) -> dict[str, float]:
    """``{"precision", "recall", "density", "coverage"}`` of ``fake_features`` against ``real_features``."""
    real = _float(real_features)
    fake = _float(fake_features)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, d) and (M, d) with equal d; got {real.shape} and {fake.shape}.")
    if not 1 <= k < min(real.shape[0], fake.shape[0]):
        raise ValueError(f"k must be in [1, min(N, M) - 1 = {min(real.shape[0], fake.shape[0]) - 1}]; got {k}.")
    out = _prdc(real, fake, k, chunk_size)
    return {name: float(v) for name, v in out.items()}


@functools.partial(jax.jit, static_argnums=(2, 3))
def _prdc(real, fake, k, chunk_size):
    real_radii = kth_nearest_distance(real, k, chunk_size)
    fake_radii = kth_nearest_distance(fake, k, chunk_size)

    def per_fake(block):  # fakes inside real balls
        inside = jnp.sqrt(sq_distances_gram(block, real)) < real_radii[None, :]
        return jnp.any(inside, axis=1), jnp.sum(inside, axis=1)

    def per_real(block_and_radius):  # reals inside fake balls; nearest fake within own ball
        block, radius = block_and_radius
        d = jnp.sqrt(sq_distances_gram(block, fake))
        return jnp.any(d < fake_radii[None, :], axis=1), jnp.min(d, axis=1) < radius

    in_real, counts = map_row_chunks(per_fake, fake, chunk_size)
    in_fake, covered = map_row_chunks(per_real, (real, real_radii), chunk_size)
    return {
        "precision": jnp.mean(in_real),
        "recall": jnp.mean(in_fake),
        "density": jnp.sum(counts) / (k * fake.shape[0]),
        "coverage": jnp.mean(covered),
    }
