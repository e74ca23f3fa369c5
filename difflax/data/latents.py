"""Precomputed latents (e.g. Stable Diffusion VAE latents of ImageNet 256) for latent diffusion.

Encoding images with a frozen autoencoder once, ahead of training, turns latent-diffusion
training (LDM, DiT) into training on a small array dataset. :class:`LatentDataset` reads
such a dataset with the interface of the embedded datasets
(:mod:`difflax.data.arrays`): ``batch(seed, step, batch_size, process_index,
process_count)`` is this process's slice of the global batch of ``step``, a pure function
of ``(seed, step)``, read in epochs of a fresh permutation per ``(seed, epoch)``.

Storage (config name ``"latents:<path>"``):

- ``<file>.npz`` with ``latents`` ``(N, H, W, C)`` (NHWC, any float dtype) and ``labels``
  ``(N,)`` integers; loaded into memory.
- a directory with ``latents.npy`` and ``labels.npy``: memory-mapped, for datasets larger
  than memory (ImageNet at 32x32x4 in float16 is about 10 GB).

Either may hold optional scalars ``shift`` and ``scale`` (keys of the ``.npz``, or
``shift.npy`` and ``scale.npy``): the latents ``z`` are read as ``(z - shift) * scale``, the
``to_latent`` of :class:`~difflax.models.AutoencoderKL` (scale 0.18215 for raw SD-VAE means);
without them the latents are used as stored. An optional scalar ``num_classes`` gives the
class count, which otherwise is ``max(labels) + 1``. :func:`difflax.data.encode.encode_dataset`
writes such a directory from images (with the VAE recorded in ``vae.json`` for decoding).
"""

from __future__ import annotations

import os

import numpy as np

from difflax.data.arrays import Batch, epoch_indices, local_slice

__all__ = ["LatentDataset", "latent_dataset"]


def _load(path: str):
    if os.path.isdir(path):
        arrays = {}
        for key in ("latents", "labels", "scale", "shift", "num_classes"):
            file = os.path.join(path, f"{key}.npy")
            if os.path.exists(file):
                arrays[key] = np.load(file, mmap_mode="r" if key in ("latents", "labels") else None)
    elif os.path.isfile(path):
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
    else:
        raise FileNotFoundError(f"no latent dataset at {path!r}: expected an .npz file or a directory of .npy files.")
    missing = [key for key in ("latents", "labels") if key not in arrays]
    if missing:
        raise ValueError(
            f"the latent dataset at {path!r} lacks {missing}; it needs 'latents' (N, H, W, C) and 'labels'."
        )
    return arrays


class LatentDataset:
    """Precomputed latents and labels; ``flip=True`` adds random horizontal flips of the latents.

    A flipped latent is only approximately the latent of the flipped image; encode both
    orientations ahead of time (and store both) for exact flips.
    """

    def __init__(self, path: str, flip: bool = False):
        arrays = _load(path)
        self.path, self.flip = path, bool(flip)
        self.latents, self.labels = arrays["latents"], arrays["labels"]
        if self.latents.ndim != 4:
            raise ValueError(f"latents must be (N, H, W, C); got shape {self.latents.shape} in {path!r}.")
        if len(self.latents) != len(self.labels) or len(self.latents) == 0:
            raise ValueError(
                f"latents ({len(self.latents)}) and labels ({len(self.labels)}) must have the same, non-zero length."
            )
        self.scale = float(arrays["scale"]) if "scale" in arrays else 1.0
        self.shift = float(arrays["shift"]) if "shift" in arrays else 0.0
        self.example_shape = tuple(int(d) for d in self.latents.shape[1:])
        if "num_classes" in arrays:
            self.num_classes = int(arrays["num_classes"])
        else:
            self.num_classes = int(np.max(self.labels)) + 1

    def __len__(self) -> int:
        return len(self.latents)

    def __repr__(self) -> str:
        return (
            f"LatentDataset({self.path!r}, records={len(self)}, example_shape={self.example_shape}, "
            f"num_classes={self.num_classes}, scale={self.scale}, shift={self.shift}, flip={self.flip})"
        )

    def batch(self, seed: int, step: int, batch_size: int, process_index: int = 0, process_count: int = 1) -> Batch:
        """This process's slice of the global batch of ``step``: a pure function of ``(seed, step)``."""
        if step < 0:
            raise ValueError(f"step must be non-negative; got {step}.")
        local = local_slice(batch_size, process_index, process_count)
        idx = epoch_indices(seed, step * batch_size, batch_size, len(self))[local]
        order = np.argsort(idx)  # sorted reads are faster from a memory map
        x = np.empty((len(idx), *self.example_shape), np.float32)
        x[order] = self.latents[idx[order]]
        if self.shift != 0.0:
            x -= np.float32(self.shift)
        if self.scale != 1.0:
            x *= np.float32(self.scale)
        if self.flip:
            flips = np.random.default_rng([seed, step, 1]).random(batch_size)[local] < 0.5
            x[flips] = x[flips, :, ::-1]
        return {"x": x, "y": np.asarray(self.labels[idx], dtype=np.int32)}


def latent_dataset(name: str, split: str = "train", image_size: int | None = None) -> LatentDataset:
    """The dataset of a config name ``"latents:<path>"`` (used by :func:`~difflax.data.make_dataset`).

    ``split`` is not used (the file is one split); ``image_size``, if given, must be the
    latents' height and width.
    """
    del split
    if not name.startswith("latents:") or len(name) == len("latents:"):
        raise ValueError(f"expected a dataset name of the form 'latents:<path>'; got {name!r}.")
    dataset = LatentDataset(os.path.expanduser(name[len("latents:") :]))
    if image_size is not None and tuple(dataset.example_shape[:2]) != (image_size, image_size):
        raise ValueError(
            f"data.image_size={image_size} does not match the latents' size {dataset.example_shape[:2]}; "
            "set it to the latent size or None."
        )
    return dataset
