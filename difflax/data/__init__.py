"""Datasets: embedded ones (2-D toys, sklearn digits) and tfds image datasets through grain.

Embedded datasets are deterministic functions of ``(seed, step)``: the batch a training
step sees depends on nothing else, so a resumed run reads exactly the batches it would
have read without stopping, and each process of a multi-host job takes its own slice.
"""

from difflax.data.digits import digits_dataset, load_digits
from difflax.data.pipeline import ArrayDataset, Batch, make_dataset
from difflax.data.toy2d import TOY_DATASETS, sample_toy, toy_mixture

__all__ = [
    "TOY_DATASETS",
    "ArrayDataset",
    "Batch",
    "digits_dataset",
    "load_digits",
    "make_dataset",
    "sample_toy",
    "toy_mixture",
]
