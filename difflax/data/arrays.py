"""Batches as pure functions of ``(seed, step)``, and the in-memory dataset of arrays.

A dataset has ``example_shape``, ``num_classes`` and
``batch(seed, step, batch_size, process_index=0, process_count=1)``, which returns this
process's slice of the global batch of ``step`` as numpy arrays ``{"x": ..., "y": ...}``.
Because the global batch depends only on ``(seed, step)``, a run resumed at step ``s``
continues with exactly the batches an uninterrupted run would have seen, and a
multi-process job with the same global batch size sees the same data as a single process.

Datasets of records read the global stream in epochs: position ``i`` of the stream is record
``perm_e[i mod N]`` of epoch ``e = i div N``, with a fresh permutation ``perm_e`` of the ``N``
records for every ``(seed, e)``; the global batch of ``step`` is positions
``[step B, (step + 1) B)`` and process ``p`` of ``P`` takes positions
``[step B + p B / P, step B + (p + 1) B / P)`` of it.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

__all__ = ["ArrayDataset", "Batch", "epoch_indices", "epoch_permutation", "local_slice"]

Batch = dict


def local_slice(batch_size: int, process_index: int, process_count: int) -> slice:
    """The slice of the global batch that process ``process_index`` of ``process_count`` reads."""
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes {process_count}.")
    local = batch_size // process_count
    return slice(process_index * local, (process_index + 1) * local)


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_records: int) -> np.ndarray:
    """The order of the records in ``epoch`` (read-only): a permutation seeded by ``(seed, epoch)``."""
    perm = np.random.default_rng([int(seed), int(epoch)]).permutation(num_records)
    perm.flags.writeable = False
    return perm


def epoch_indices(seed: int, start: int, count: int, num_records: int) -> np.ndarray:
    """Record indices of stream positions ``[start, start + count)``, read in epochs of :func:`epoch_permutation`."""
    epochs, offsets = np.divmod(np.arange(start, start + count), num_records)
    out = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = epoch_permutation(int(seed), int(epoch), num_records)[offsets[sel]]
    return out


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """An in-memory dataset of ``images`` and ``labels``, read in epochs (:func:`epoch_indices`)."""

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

    def batch(self, seed: int, step: int, batch_size: int, process_index: int = 0, process_count: int = 1) -> Batch:
        local = local_slice(batch_size, process_index, process_count)
        idx = epoch_indices(seed, step * batch_size, batch_size, len(self))[local]
        return {"x": self.images[idx], "y": self.labels[idx]}
