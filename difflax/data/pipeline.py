"""Batches as pure functions of ``(seed, step)`` for the embedded datasets.

A dataset here has ``batch(seed, step, batch_size, process_index=0, process_count=1)``
returning this process's slice of the global batch of ``step`` as numpy arrays
``{"x": ..., "y": ...}``. Because the global batch depends only on ``(seed, step)``, a
run resumed at step ``s`` continues with exactly the batches an uninterrupted run would
have seen, and a multi-process job with the same global batch size sees the same data as
a single process.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import numpy as np

from difflax.data.toy2d import TOY_DATASETS, sample_toy

__all__ = ["ArrayDataset", "Batch", "Dataset", "ToyDataset", "make_dataset"]

Batch = dict


class Dataset(Protocol):
    example_shape: tuple
    num_classes: int

    def batch(self, seed: int, step: int, batch_size: int, process_index: int = 0, process_count: int = 1) -> Batch:
        ...


def _local_slice(batch_size: int, process_index: int, process_count: int) -> slice:
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes {process_count}.")
    local = batch_size // process_count
    return slice(process_index * local, (process_index + 1) * local)


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """An in-memory dataset, read in epochs of a fresh permutation per ``(seed, epoch)``."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if len(self.images) != len(self.labels):
            raise ValueError(f"images ({len(self.images)}) and labels ({len(self.labels)}) differ in length.")

    @property
    def example_shape(self) -> tuple:
        return tuple(self.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    def __len__(self) -> int:
        return len(self.images)

    def _indices(self, seed: int, start: int, count: int) -> np.ndarray:
        n = len(self)
        positions = np.arange(start, start + count)
        epochs, offsets = np.divmod(positions, n)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
            sel = epochs == epoch
            out[sel] = perm[offsets[sel]]
        return out

    def batch(self, seed: int, step: int, batch_size: int, process_index: int = 0, process_count: int = 1) -> Batch:
        idx = self._indices(seed, step * batch_size, batch_size)[_local_slice(batch_size, process_index, process_count)]
        return {"x": self.images[idx], "y": self.labels[idx]}


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
        local = _local_slice(batch_size, process_index, process_count)
        return {"x": np.asarray(x)[local], "y": np.asarray(y)[local]}


def make_dataset(name: str, split: str = "train", image_size: int | None = None):
    """A dataset by config name: ``"digits"``, a toy name (``"swiss_roll"``, ``"moons"``,
    ``"grid"``, ``"rings"``), ``"tfds:<name>"`` (:mod:`difflax.data.tfds`, e.g. ``"tfds:cifar10"``)
    or ``"latents:<path>"`` (:mod:`difflax.data.latents`)."""
    if name == "digits":
        from difflax.data.digits import digits_dataset

        return digits_dataset(split, size=image_size or 8)
    if name in TOY_DATASETS:
        return ToyDataset(name)
    if name.startswith("tfds:"):
        from difflax.data.tfds import tfds_dataset

        return tfds_dataset(name, split, image_size)
    if name.startswith("latents:"):
        from difflax.data.latents import latent_dataset

        return latent_dataset(name, split, image_size)
    raise ValueError(
        f"Unknown dataset {name!r}; expected 'digits', 'tfds:<tfds name>', 'latents:<path>' "
        f"or one of {', '.join(map(repr, TOY_DATASETS))}."
    )
