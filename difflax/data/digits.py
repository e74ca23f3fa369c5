"""The 8x8 handwritten digits that ship with scikit-learn (1797 images, 10 classes).

Pixels (0..16) are scaled to ``[-1, 1]``; images are NHWC ``(N, 8, 8, 1)``, optionally
zero-padded (background is -1) or bilinearly up-sampled to a larger size. The split into
train and test is fixed (every fifth image is held out), so metrics are comparable
across runs.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from difflax.data.arrays import ArrayDataset

__all__ = ["digits_dataset", "load_digits"]


@functools.cache
def _raw():
    from sklearn.datasets import load_digits as _sk_load

    data = _sk_load()
    images = data.images.astype(np.float32) / 8.0 - 1.0  # 0..16 -> [-1, 1]
    return images[..., None], data.target.astype(np.int32)


def load_digits(split: str = "train", size: int = 8, mode: str = "pad"):
    """``(images, labels)`` of the ``"train"``, ``"test"`` or ``"all"`` split at ``size x size``.

    ``mode="pad"`` pads with background to ``size``; ``mode="resize"`` up-samples bilinearly.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all'; got {split!r}.")
    if size < 8:
        raise ValueError(f"size must be at least 8; got {size}.")
    if mode not in ("pad", "resize"):
        raise ValueError(f"mode must be 'pad' or 'resize'; got {mode!r}.")
    images, labels = _raw()
    held_out = np.arange(len(labels)) % 5 == 0
    keep = {"train": ~held_out, "test": held_out, "all": np.ones_like(held_out)}[split]
    images, labels = images[keep], labels[keep]
    if size != 8:
        if mode == "pad":
            lo = (size - 8) // 2
            pad = ((0, 0), (lo, size - 8 - lo), (lo, size - 8 - lo), (0, 0))
            images = np.pad(images, pad, constant_values=-1.0)
        else:
            images = np.asarray(jax.image.resize(images, (len(images), size, size, 1), "bilinear"))
    return images, labels


def digits_dataset(split: str = "train", size: int = 8, mode: str = "pad") -> ArrayDataset:
    """The digits as an :class:`~difflax.data.arrays.ArrayDataset`."""
    images, labels = load_digits(split, size, mode)
    return ArrayDataset(images=images, labels=labels)
