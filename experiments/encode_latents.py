"""Encode an image dataset into VAE latents for latent diffusion.

``python -m experiments.encode_latents --vae=DIR --out=DIR [--dataset=digits|tfds:<name>] [...]``

``--vae`` is a diffusers ``AutoencoderKL`` folder (``config.json`` and safetensors), or a pipeline's
root holding ``vae/``. Writes into ``--out`` what ``data.name = "latents:<out>"`` trains on
(:mod:`difflax.data.encode`: ``latents.npy``, ``labels.npy``, ``scale.npy``, ``shift.npy``,
``num_classes.npy`` and ``vae.json``, which lets ``experiments.sample`` decode samples to images).
Nothing is downloaded: a tfds dataset must be prepared already.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from difflax.data.encode import encode_dataset, image_dataset
from difflax.hub import ConversionError

_VAE = flags.DEFINE_string("vae", None, "diffusers AutoencoderKL folder, or a pipeline root with vae/.", required=True)
_OUT = flags.DEFINE_string("out", None, "Directory to write the latents into.", required=True)
_DATASET = flags.DEFINE_string("dataset", "digits", "'digits' or 'tfds:<tfds name>'.")
_SPLIT = flags.DEFINE_string("split", "train", "Split to encode.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Image height and width (digits: padded; tfds: resized).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Images encoded per jitted call.")
_NUM = flags.DEFINE_integer("num", None, "Encode only this many records (default: all).")
_SAMPLE = flags.DEFINE_bool("sample", False, "Store posterior samples instead of the posterior mode.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the record order (and of posterior samples).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "Storage dtype of the latents.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace latents already in --out.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        dataset = image_dataset(_DATASET.value, _SPLIT.value, _IMAGE_SIZE.value)
        latents = encode_dataset(dataset, _VAE.value, _OUT.value, name=_DATASET.value, split=_SPLIT.value,
                                 batch_size=_BATCH_SIZE.value, num=_NUM.value, sample=_SAMPLE.value,
                                 seed=_SEED.value, dtype=_DTYPE.value, overwrite=_OVERWRITE.value)
    except (ConversionError, FileExistsError, FileNotFoundError, ImportError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(f"wrote {latents!r}; train with --config.data.name=latents:{latents.path}")


if __name__ == "__main__":
    app.run(main)
