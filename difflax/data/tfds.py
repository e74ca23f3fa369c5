"""Any tfds image dataset through ``tfds.data_source`` (ArrayRecord, no TensorFlow) and grain.

:class:`TfdsDataset` has the interface of the embedded datasets
(:mod:`difflax.data.arrays`): ``batch(seed, step, batch_size, process_index,
process_count)`` returns this process's slice ``{"x": (B / P, H, W, C) float32 in [-1, 1],
"y": (B / P,) int32}`` of the global batch of ``step``, a pure function of ``(seed, step)``.
The pipeline is a grain ``MapDataset`` (random access, so no iterator state is needed):

1. ``tfds.data_source(name, split)``: random access to the ArrayRecord files of a
   prepared dataset (``tfds build <name> --file_format=array_record``; ``TFDS_DATA_DIR``
   or ``data_dir`` says where). Reading needs neither TensorFlow nor a download.
2. ``shuffle`` then ``repeat``: a fresh permutation of the records for every epoch, from a
   seed derived from ``seed`` (grain's index shuffle, no permutation table in memory).
3. ``map``: the image (center-cropped and resized to ``image_size`` if given, with box
   then bicubic filtering as in ADM) and the label.
4. ``random_map``: random horizontal flips, the generator seeded by ``(seed, position in the
   stream)``, so a record is flipped differently in different epochs but reproducibly.
5. ``map``: ``uint8 -> float32`` in ``[-1, 1]``; ``batch`` of the per-process size.

Multi-host: element ``i`` of the stream is position ``i`` of the global order, and process
``p`` of ``P`` reads positions ``[s B + p B/P, s B + (p + 1) B/P)`` of step ``s``: the
global batch is the same whatever the number of processes (unlike sharding the records,
e.g. with grain's ``ShardByJaxProcess``, which makes the batch depend on ``P``), and each
process reads only its own records.

The trainer (:class:`difflax.train.Trainer`) uses the step-indexed :meth:`TfdsDataset.batch`:
its checkpoint step is the whole data position (a background thread reads step ``s + 1``
while step ``s`` trains). :meth:`TfdsDataset.iterator` gives the
same batches as a grain iterator (thread prefetching, ``get_state`` / ``set_state``
checkpointing) for loops written around grain.

Needs the ``tfds`` extra: ``pip install difflax[tfds]`` (tensorflow-datasets and grain).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from difflax.data.arrays import Batch, local_slice

__all__ = ["TfdsDataset", "center_crop_resize", "import_tfds_and_grain", "tfds_dataset"]

_CACHED_PIPELINES = 8  # grain pipelines kept per dataset, one per (seed, local batch size)


def import_tfds_and_grain():
    """``(tensorflow_datasets, grain)``, or an ``ImportError`` that names the ``tfds`` extra."""
    try:
        import grain
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            f"tfds datasets need tensorflow-datasets and grain ({e}); install the tfds extra: "
            "pip install 'difflax[tfds]' (TensorFlow itself is not needed)."
        ) from e
    return tfds, grain


def _derived_seed(seed: int, stream: int) -> int:
    """A 32-bit seed for one random stream of the pipeline (grain takes seeds in ``[0, 2^32)``).

    Hashing through ``SeedSequence`` keeps neighbouring user seeds apart: grain's shuffle
    uses ``seed + epoch`` for each epoch, so raw seeds ``s`` and ``s + 1`` would share
    permutations one epoch apart.
    """
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed}.")
    return int(np.random.SeedSequence([int(seed), stream]).generate_state(1)[0])


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Center-crop an ``(H, W, C)`` uint8 image to a square and resize it to ``size x size``.

    As ADM's ``center_crop_arr`` (Dhariwal & Nichol 2021): halve with a box filter while
    the short side is at least ``2 size``, bicubic to a short side of ``size``, then crop.
    """
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W, C); got shape {image.shape}.")
    if image.shape[0] == image.shape[1] == size:
        return image
    from PIL import Image

    gray = image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if gray else image)
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(s // 2 for s in pil.size), resample=Image.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(max(size, round(s * scale)) for s in pil.size), resample=Image.BICUBIC)
    out = np.asarray(pil)
    top, left = (out.shape[0] - size) // 2, (out.shape[1] - size) // 2
    out = out[top : top + size, left : left + size]
    return out[..., None] if gray else out


class TfdsDataset:
    """A tfds image dataset read through ``tfds.data_source`` and a grain ``MapDataset``.

    Args:
      name: the tfds name, with config and version if needed, e.g. ``"cifar10"``,
        ``"imagenet_resized/64x64"``, ``"mnist:3.0.1"``.
      split: a tfds split (``"train"``, ``"test"``, ``"train[:90%]"``, ...).
      data_dir: where the prepared dataset lives (default: tfds's, ``TFDS_DATA_DIR``).
      image_size: center-crop and resize every image to ``image_size x image_size``;
        required for datasets whose images vary in size.
      flip: random horizontal flips.
      image_key, label_key: the features holding the image and the class label;
        ``label_key=None`` reads no label (``y`` is all zeros and ``num_classes`` 1).
      download: let tfds download and prepare the dataset if it is not in ``data_dir``
        (preparation may need more than reading does; ``False`` fails fast instead).
      prefetch: after each :meth:`batch` call, read the batch of the next step in a
        background thread, so a training loop that calls ``batch`` step after step
        overlaps reading with the device's work (the result is the same either way).

    Attributes: ``example_shape`` ``(H, W, C)``, ``num_classes`` (from the dataset info),
    ``len(dataset)`` (records in the split).
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | None = None,
        image_size: int | None = None,
        flip: bool = True,
        image_key: str = "image",
        label_key: str | None = "label",
        download: bool = True,
        prefetch: bool = True,
    ):
        tfds, self._grain = import_tfds_and_grain()
        if image_size is not None and int(image_size) <= 0:
            raise ValueError(f"image_size must be a positive integer or None; got {image_size}.")
        self.name, self.split, self.flip = name, split, bool(flip)
        self.image_size = None if image_size is None else int(image_size)
        self.image_key, self.label_key = image_key, label_key
        try:
            self.source = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
        except Exception:
            builder = tfds.builder(name, data_dir=data_dir)
            if not download and not builder.is_prepared():  # tfds's own message blames the file format
                raise FileNotFoundError(not_prepared_message(name, builder.data_dir)) from None
            raise
        features = self.source.dataset_info.features
        if image_key not in features:
            raise ValueError(f"image_key {image_key!r} is not a feature of {name!r}; features: {list(features)}.")
        if label_key is not None and label_key not in features:
            raise ValueError(
                f"label_key {label_key!r} is not a feature of {name!r}; features: {list(features)} "
                "(label_key=None reads no labels)."
            )
        shape = tuple(features[image_key].shape)
        if len(shape) != 3:
            raise ValueError(f"feature {image_key!r} of {name!r} must be an (H, W, C) image; got shape {shape}.")
        if self.image_size is None and None in shape[:2]:
            raise ValueError(f"images of {name!r} vary in size ({shape}); set image_size to resize them.")
        if shape[2] is None:
            raise ValueError(f"images of {name!r} have an unknown number of channels ({shape}).")
        self.example_shape = (self.image_size, self.image_size, shape[2]) if self.image_size else shape
        self.num_classes = 1 if label_key is None else int(features[label_key].num_classes)
        self._max_value = float(np.iinfo(np.dtype(features[image_key].np_dtype)).max)
        if len(self.source) == 0:
            raise ValueError(f"split {split!r} of {name!r} has no records.")
        self.prefetch = bool(prefetch)
        self._pipelines: dict = {}
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._ahead = None  # (arguments of the next batch, future of its read)

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:
        return (
            f"TfdsDataset({self.name!r}, split={self.split!r}, records={len(self)}, "
            f"example_shape={self.example_shape}, num_classes={self.num_classes}, flip={self.flip})"
        )

    # ------------------------------------------------------------------ per record
    def _prepare(self, record: dict) -> dict:
        image = np.asarray(record[self.image_key])
        if self.image_size is not None:
            image = center_crop_resize(image, self.image_size)
        label = 0 if self.label_key is None else record[self.label_key]
        return {"x": image, "y": np.int32(label)}

    @staticmethod
    def _random_flip(example: dict, rng: np.random.Generator) -> dict:
        if rng.random() < 0.5:
            example = {**example, "x": example["x"][:, ::-1]}
        return example

    def _to_float(self, example: dict) -> dict:
        x = example["x"].astype(np.float32) * np.float32(2.0 / self._max_value) - np.float32(1.0)
        return {"x": x, "y": example["y"]}

    # ------------------------------------------------------------------ pipelines
    def records(self, seed: int):
        """The infinite grain ``MapDataset`` of examples: element ``i`` is position ``i`` of the order of ``seed``."""
        ds = self._grain.MapDataset.source(self.source)
        ds = ds.shuffle(seed=_derived_seed(seed, 0)).repeat()
        ds = ds.map(self._prepare)
        if self.flip:
            ds = ds.random_map(self._random_flip, seed=_derived_seed(seed, 1))
        return ds.map(self._to_float)

    def _batches(self, seed: int, local_batch_size: int):
        key = (int(seed), int(local_batch_size))
        with self._lock:
            if key not in self._pipelines:
                if len(self._pipelines) >= _CACHED_PIPELINES:
                    self._pipelines.pop(next(iter(self._pipelines)))
                self._pipelines[key] = self.records(seed).batch(local_batch_size, drop_remainder=True)
            return self._pipelines[key]

    def _read(self, args: tuple) -> Batch:
        seed, step, batch_size, process_index, process_count = args
        local = local_slice(batch_size, process_index, process_count)
        return self._batches(seed, local.stop - local.start)[step * process_count + process_index]

    def batch(self, seed: int, step: int, batch_size: int, process_index: int = 0, process_count: int = 1) -> Batch:
        """This process's slice of the global batch of ``step``: a pure function of ``(seed, step)``."""
        if step < 0:
            raise ValueError(f"step must be non-negative; got {step}.")
        local_slice(batch_size, process_index, process_count)  # checks the arguments
        args = (int(seed), int(step), int(batch_size), int(process_index), int(process_count))
        ahead, self._ahead = self._ahead, None
        result = ahead[1].result() if ahead is not None and ahead[0] == args else self._read(args)
        if self.prefetch:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="difflax-tfds-prefetch")
            following = (args[0], args[1] + 1, *args[2:])
            self._ahead = (following, self._executor.submit(self._read, following))
        return result

    def iterator(
        self,
        seed: int,
        batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
        start_step: int = 0,
        *,
        num_threads: int = 8,
        prefetch_buffer_size: int = 4,
    ):
        """A grain ``DatasetIterator`` over this process's slices of the global batches.

        Its ``k``-th batch is ``batch(seed, start_step + k, batch_size, process_index,
        process_count)``; batches are read ahead by ``num_threads`` threads. The iterator is
        checkpointable: ``get_state()`` is ``{"next_index": step of the next batch}`` and
        ``set_state(state)`` resumes there (also across processes counts: the step is global).
        """
        if start_step < 0:
            raise ValueError(f"start_step must be non-negative; got {start_step}.")
        local = local_slice(batch_size, process_index, process_count)
        batches = self.records(seed).batch(local.stop - local.start, drop_remainder=True)
        mine = batches[process_index::process_count]
        options = self._grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
        it = iter(mine.to_iter_dataset(options))
        if start_step:
            it.set_state({"next_index": int(start_step)})
        return it


def not_prepared_message(name: str, where: str) -> str:
    """How to prepare a tfds dataset once, where TensorFlow is available, so that reading needs none."""
    return (
        f"the tfds dataset {name!r} is not prepared (looked in {where}). Preparing it needs TensorFlow and the "
        f"network once: `pip install tensorflow tensorflow-datasets && tfds build {name.split(':')[0]} "
        "--file_format=array_record --data_dir=DIR`; then set TFDS_DATA_DIR=DIR here (reading needs no "
        "TensorFlow)."
    )


def tfds_dataset(name: str, split: str = "train", image_size: int | None = None) -> TfdsDataset:
    """The dataset of a config name ``"tfds:<name>"`` (used by :func:`~difflax.data.make_dataset`).

    A training job never downloads: an unprepared dataset fails at once with the command that prepares it.
    """
    if not name.startswith("tfds:") or len(name) == len("tfds:"):
        raise ValueError(f"expected a dataset name of the form 'tfds:<tfds name>', e.g. 'tfds:cifar10'; got {name!r}.")
    return TfdsDataset(name[len("tfds:") :], split, image_size=image_size, download=False)
