"""Generated two-dimensional datasets: swiss roll, two moons, Gaussian-mixture grids and rings.

All generators are pure JAX, ``sample_toy(name, key, n) -> (x, y)`` with ``x`` of shape
``(n, 2)`` (roughly unit scale) and integer labels ``y``. The mixtures also exist as an
exact :class:`~difflax.analytic.GaussianMixture` (:func:`toy_mixture`), so metrics on them
can use exact densities. :class:`ToyDataset` reads fresh draws as a dataset of
:mod:`difflax.data.arrays`: the global batch of step ``s`` is ``sample_toy(name, fold_in(key(seed), s))``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from difflax.analytic import GaussianMixture
from difflax.data.arrays import Batch, local_slice

__all__ = ["TOY_DATASETS", "ToyDataset", "sample_toy", "toy_mixture"]


def _swiss_roll(key, n):
    k1, k2 = jax.random.split(key)
    u = jax.random.uniform(k1, (n,))
    angle = 1.5 * math.pi * (1.0 + 2.0 * u)
    x = jnp.stack([angle * jnp.cos(angle), angle * jnp.sin(angle)], axis=1) / 7.0
    x = x + 0.05 * jax.random.normal(k2, x.shape)
    return x, jnp.floor(u * 3).astype(jnp.int32)


def _moons(key, n):
    k1, k2, k3 = jax.random.split(key, 3)
    y = jax.random.bernoulli(k1, 0.5, (n,)).astype(jnp.int32)
    angle = math.pi * jax.random.uniform(k2, (n,))
    upper = jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=1)
    lower = jnp.stack([1.0 - jnp.cos(angle), 0.5 - jnp.sin(angle)], axis=1)
    x = jnp.where(y[:, None] == 0, upper, lower) - jnp.array([0.5, 0.25])
    return x + 0.05 * jax.random.normal(k3, x.shape), y


def toy_mixture(name: str) -> GaussianMixture:
    """The exact mixture behind ``"grid"`` (5x5 modes) and ``"rings"`` (8 modes on a circle)."""
    if name == "grid":
        ticks = np.linspace(-1.6, 1.6, 5)
        means = np.array([[a, b] for a in ticks for b in ticks])
        return GaussianMixture.isotropic(jnp.asarray(means, jnp.float32), 0.08, labels=np.arange(25) % 5)
    if name == "rings":
        angles = 2 * np.pi * np.arange(8) / 8
        means = 1.6 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        return GaussianMixture.isotropic(jnp.asarray(means, jnp.float32), 0.1, labels=np.arange(8))
    raise ValueError(f"toy_mixture has no mixture {name!r}; expected 'grid' or 'rings'.")


def _mixture_sampler(name):
    def sample(key, n):
        x, comp = toy_mixture(name).sample(key, n)
        return x, toy_mixture(name).labels[comp]

    return sample


TOY_DATASETS = {
    "swiss_roll": _swiss_roll,
    "moons": _moons,
    "grid": _mixture_sampler("grid"),
    "rings": _mixture_sampler("rings"),
}


def sample_toy(name: str, key: jax.Array, n: int):
    """``n`` fresh draws ``(x, y)`` of the toy dataset ``name``."""
    if name not in TOY_DATASETS:
        raise ValueError(f"Unknown toy dataset {name!r}; expected one of {', '.join(map(repr, TOY_DATASETS))}.")
    return TOY_DATASETS[name](key, n)


@dataclasses.dataclass(frozen=True)
class ToyDataset:
    """Fresh draws of a generated 2-D dataset: step ``s`` reads ``sample_toy(name, fold_in(key, s))``."""

    name: str

    def __post_init__(self):
        if self.name not in TOY_DATASETS:
            raise ValueError(f"Unknown toy dataset {self.name!r}; expected one of {', '.join(TOY_DATASETS)}.")

    example_shape = (2,)

    @property
    def num_classes(self) -> int:
        return {"grid": 5, "rings": 8, "swiss_roll": 3, "moons": 2}[self.name]

    def batch(self, seed: int, step: int, batch_size: int, process_index: int = 0, process_count: int = 1) -> Batch:
        key = jax.random.fold_in(jax.random.key(seed), step)
        x, y = sample_toy(self.name, key, batch_size)
        local = local_slice(batch_size, process_index, process_count)
        return {"x": np.asarray(x)[local], "y": np.asarray(y)[local]}
