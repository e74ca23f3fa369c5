"""Datasets: embedded ones (2-D toys, sklearn digits), tfds image datasets through grain, latents.

Every dataset's batches are deterministic functions of ``(seed, step)``: the batch a training
step sees depends on nothing else, so a resumed run reads exactly the batches it would
have read without stopping, and each process of a multi-host job takes its own slice.

* :mod:`~difflax.data.arrays`: the batch interface, per-process slicing, :class:`ArrayDataset`.
* :mod:`~difflax.data.toy2d`, :mod:`~difflax.data.digits`, :mod:`~difflax.data.tfds`,
  :mod:`~difflax.data.latents`: the datasets.
* :mod:`~difflax.data.registry`: :func:`make_dataset`, a dataset by config name.
* :mod:`~difflax.data.encode`: :func:`encode_dataset`, images to latents with a VAE, and
  :func:`latent_decoder`, latent samples back to images.
"""

from difflax.data.arrays import ArrayDataset, Batch
from difflax.data.digits import digits_dataset, load_digits
from difflax.data.encode import encode_dataset, latent_decoder
from difflax.data.latents import LatentDataset
from difflax.data.registry import make_dataset
from difflax.data.toy2d import TOY_DATASETS, ToyDataset, sample_toy, toy_mixture

__all__ = [
    "TOY_DATASETS",
    "ArrayDataset",
    "Batch",
    "LatentDataset",
    "ToyDataset",
    "digits_dataset",
    "encode_dataset",
    "latent_decoder",
    "load_digits",
    "make_dataset",
    "sample_toy",
    "toy_mixture",
]
