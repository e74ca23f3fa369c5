"""Datasets by config name: the ``data.name`` of a recipe."""

from __future__ import annotations

from difflax.data.digits import digits_dataset
from difflax.data.latents import latent_dataset
from difflax.data.tfds import tfds_dataset
from difflax.data.toy2d import TOY_DATASETS, ToyDataset

__all__ = ["make_dataset"]


def make_dataset(name: str, split: str = "train", image_size: int | None = None):
    """A dataset by config name: ``"digits"``, a toy name (``"swiss_roll"``, ``"moons"``,
    ``"grid"``, ``"rings"``), ``"tfds:<name>"`` (:mod:`difflax.data.tfds`, e.g. ``"tfds:cifar10"``)
    or ``"latents:<path>"`` (:mod:`difflax.data.latents`)."""
    if name == "digits":
        return digits_dataset(split, size=image_size or 8)
    if name in TOY_DATASETS:
        return ToyDataset(name)
    if name.startswith("tfds:"):
        return tfds_dataset(name, split, image_size)
    if name.startswith("latents:"):
        return latent_dataset(name, split, image_size)
    raise ValueError(
        f"Unknown dataset {name!r}; expected 'digits', 'tfds:<tfds name>', 'latents:<path>' "
        f"or one of {', '.join(map(repr, TOY_DATASETS))}."
    )
