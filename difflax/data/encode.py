"""Encoding an image dataset into VAE latents for latent diffusion, and decoding samples back to images.

Latent diffusion (Rombach et al. 2022) trains on ``x = to_latent(z) = (z - shift_factor) *
scaling_factor`` where ``z`` is the autoencoder's latent of an image (the posterior mode, or a
sample); section 4.3.2 of the paper chooses the factor so that ``x`` has about unit variance.
:func:`encode_dataset` encodes once, ahead of training, into a directory that
:class:`~difflax.data.latents.LatentDataset` reads (config name ``"latents:<dir>"``):

- ``latents.npy``: ``(N, h, w, c)`` raw latents ``z`` (float32 or float16), written in
  chunks through a memory map, so a dataset larger than memory is encoded in constant memory;
- ``labels.npy`` ``(N,)`` int32 and ``num_classes.npy``;
- ``scale.npy`` and ``shift.npy``: the VAE's ``scaling_factor`` and ``shift_factor`` (0 when it
  has none); the dataset reads ``x = (z - shift) * scale``, exactly :meth:`AutoencoderKL.to_latent`;
- ``vae.json``, written last: the VAE folder's absolute ``path``, its ``scaling_factor`` and
  ``shift_factor``, the ``posterior`` used (``"mode"`` or ``"sample"``), the source ``dataset``,
  ``split``, ``image_shape`` and storage ``dtype``.

Record ``j`` is position ``j`` of the source dataset's stream for ``seed`` (see
:mod:`difflax.data.arrays`): every record once, in a shuffled order. The latents are written to
``latents.npy.partial`` and renamed when complete, so an interrupted encoding leaves no ``latents.npy``.

A diffusion model's sample ``x0`` of such data decodes as ``decode(x0 / scale + shift)``, the
inverse of the dataset's map (:meth:`AutoencoderKL.from_latent` with the recorded factors):
:func:`latent_decoder` finds the VAE through ``vae.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from difflax.data.latents import LatentDataset
from difflax.data.registry import make_dataset
from difflax.hub.pipeline import model_folder
from difflax.hub.vae import convert_autoencoder_kl
from difflax.models.autoencoder import AutoencoderKL

__all__ = ["VAE_RECORD", "decode_latents", "encode_dataset", "encode_images", "image_dataset", "latent_decoder",
           "read_vae_record"]

VAE_RECORD = "vae.json"
_DTYPES = ("float32", "float16")


def image_dataset(name: str, split: str = "train", image_size: int | None = None):
    """The images to encode: ``"digits"`` (:func:`~difflax.data.make_dataset`) or ``"tfds:<name>"``
    (:class:`~difflax.data.tfds.TfdsDataset` without random flips; never downloads)."""
    if name == "digits":
        return make_dataset(name, split, image_size)
    if name.startswith("tfds:") and len(name) > len("tfds:"):
        from difflax.data.tfds import TfdsDataset

        return TfdsDataset(name[len("tfds:"):], split, image_size=image_size, flip=False, download=False)
    raise ValueError(f"dataset must be 'digits' or 'tfds:<tfds name>' to encode; got {name!r}.")


def encode_images(vae: AutoencoderKL, params, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """The latents ``z`` of images ``x`` ``(B, H, W, C)`` in ``[-1, 1]``: the posterior mode, or a sample if ``key``.

    A one-channel image is repeated to the three channels of a VAE that takes RGB.
    """
    in_channels = params["encoder"]["conv_in"]["kernel"].shape[2]
    if x.shape[-1] == 1 and in_channels == 3:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[-1] != in_channels:
        raise ValueError(f"the images have {x.shape[-1]} channels; the VAE takes {in_channels}.")
    posterior = vae.apply({"params": params}, x, method="encode")
    return posterior.mode() if key is None else posterior.sample(key)


def decode_latents(vae: AutoencoderKL, params, x: jax.Array, scale: float, shift: float) -> jax.Array:
    """Images ``decode(z)`` of diffusion latents ``x = (z - shift) * scale``: ``z = x / scale + shift``."""
    return vae.apply({"params": params}, x / scale + shift, method="decode")


_FILES = ("latents.npy", "labels.npy", "num_classes.npy", "scale.npy", "shift.npy", VAE_RECORD)


def _clear_output(directory: str, overwrite: bool) -> None:
    """Make ``directory``, refusing (or with ``overwrite``, removing) the files of an earlier encoding."""
    taken = [n for n in _FILES if os.path.exists(os.path.join(directory, n))]
    if taken and not overwrite:
        raise FileExistsError(f"{directory} already holds {', '.join(taken)}; choose another directory or "
                              "pass overwrite=True.")
    os.makedirs(directory, exist_ok=True)
    for name in taken:
        os.remove(os.path.join(directory, name))


def encode_dataset(dataset, vae: str | os.PathLike, directory: str | os.PathLike, *, name: str = "", split: str = "",
                   batch_size: int = 64, num: int | None = None, sample: bool = False, seed: int = 0,
                   dtype: str = "float32", overwrite: bool = False) -> LatentDataset:
    """Encode ``dataset`` with the diffusers ``AutoencoderKL`` folder ``vae`` into ``directory`` (module docstring).

    ``dataset`` has ``batch(seed, step, batch_size)`` and ``len()`` (e.g. :func:`image_dataset`); the
    first ``num`` positions of its stream for ``seed`` are encoded (default: every record once), in
    jitted batches of ``batch_size``, with the posterior mode, or a sample (``sample=True``, keys from
    ``seed``). ``vae`` may be a pipeline's root holding ``vae/``. ``name`` and ``split`` are recorded.
    Returns the :class:`LatentDataset` of ``directory``.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}; got {dtype!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    total = len(dataset) if num is None else int(num)
    if not 1 <= total <= len(dataset):
        raise ValueError(f"num must be in [1, {len(dataset)}] (the dataset's records); got {num}.")
    folder = os.path.abspath(model_folder(os.path.expanduser(vae), "vae"))
    model, params, info = convert_autoencoder_kl(folder)
    directory = os.path.expanduser(directory)
    _clear_output(directory, overwrite)

    def encode(x, key):
        return encode_images(model, params, x, key if sample else None)

    encode = jax.jit(encode)
    image_shape = tuple(dataset.example_shape)
    latent = jax.eval_shape(encode, jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.float32), jax.random.key(0))
    partial = os.path.join(directory, "latents.npy.partial")  # renamed when complete
    latents = np.lib.format.open_memmap(partial, "w+", dtype, (total, *latent.shape[1:]))
    labels = np.empty(total, np.int32)
    for step, start in enumerate(range(0, total, batch_size)):
        batch = dataset.batch(seed, step, batch_size)
        z = np.asarray(encode(jnp.asarray(batch["x"], jnp.float32), jax.random.fold_in(jax.random.key(seed), step)))
        stop = min(start + batch_size, total)
        stored = z[: stop - start].astype(dtype)
        if not np.isfinite(stored).all():
            raise ValueError(f"latents of records {start}..{stop - 1} are not finite in {dtype}; "
                             "store float32 (dtype='float32').")
        latents[start:stop] = stored
        labels[start:stop] = batch["y"][: stop - start]
    latents.flush()
    del latents
    scale, shift = float(info["scaling_factor"]), float(info["shift_factor"] or 0.0)
    np.save(os.path.join(directory, "labels.npy"), labels)
    np.save(os.path.join(directory, "num_classes.npy"), np.int64(dataset.num_classes))
    np.save(os.path.join(directory, "scale.npy"), np.float64(scale))
    np.save(os.path.join(directory, "shift.npy"), np.float64(shift))
    os.replace(partial, os.path.join(directory, "latents.npy"))
    record = {"path": folder, "scaling_factor": scale, "shift_factor": shift,
              "posterior": "sample" if sample else "mode", "dataset": name, "split": split,
              "image_shape": list(image_shape), "dtype": dtype}
    with open(os.path.join(directory, VAE_RECORD), "w") as f:
        json.dump(record, f, indent=2)
    return LatentDataset(directory)


def read_vae_record(directory: str) -> dict | None:
    """The ``vae.json`` of a latent dataset directory, or None when there is none (no VAE recorded)."""
    file = os.path.join(directory, VAE_RECORD)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        record = json.load(f)
    if "path" not in record:
        raise ValueError(f"{file} lacks the key 'path' (the VAE folder).")
    return record


def dataset_decoder(name: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """The decoder of the dataset named ``name`` in a recipe: :func:`latent_decoder` for
    ``latents:<dir>`` with a recorded VAE, ``None`` for anything else (data that needs no decoding)."""
    if not name.startswith("latents:"):
        return None
    directory = os.path.expanduser(name[len("latents:"):])
    return latent_decoder(directory) if os.path.isdir(directory) else None


def latent_decoder(directory: str, batch_size: int = 16) -> Callable[[np.ndarray], np.ndarray] | None:
    """``decode(x) -> images`` for samples ``x`` of the latent dataset in ``directory``, or None without ``vae.json``.

    The VAE is converted from the recorded folder, and must still have the recorded factors; latents
    are decoded by :func:`decode_latents` with the dataset's ``scale`` and ``shift``, in jitted
    batches of ``batch_size``.
    """
    record = read_vae_record(directory)
    if record is None:
        return None
    if not os.path.isdir(record["path"]):
        raise FileNotFoundError(f"the VAE folder {record['path']} named by {os.path.join(directory, VAE_RECORD)} "
                                "does not exist; set its 'path' to the VAE's folder on this machine.")
    model, params, info = convert_autoencoder_kl(record["path"])
    for key in ("scaling_factor", "shift_factor"):
        if float(info[key] or 0.0) != float(record.get(key) or 0.0):
            raise ValueError(f"the VAE at {record['path']} has {key} = {info[key]}, but the latents in {directory} "
                             f"were encoded with {record.get(key)}: it is not the VAE they were encoded with.")
    data = LatentDataset(directory)
    decode = jax.jit(lambda x: decode_latents(model, params, x, data.scale, data.shift))

    def decode_all(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        pad = -len(x) % batch_size
        padded = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        out = [np.asarray(decode(padded[i:i + batch_size])) for i in range(0, len(padded), batch_size)]
        return np.concatenate(out)[: len(x)]

    return decode_all
