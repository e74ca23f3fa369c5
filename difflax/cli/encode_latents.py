"""Encode an image dataset into VAE latents for latent diffusion.

``difflax-encode-latents --vae=DIR --out=DIR [--dataset=digits|tfds:<name>] [...]``

``--vae`` is a diffusers ``AutoencoderKL`` folder (``config.json`` and safetensors), or a pipeline's
root holding ``vae/``. Writes into ``--out`` what ``data.name = "latents:<out>"`` trains on
(:mod:`difflax.data.encode`: ``latents.npy``, ``labels.npy``, ``scale.npy``, ``shift.npy``,
``num_classes.npy`` and ``vae.json``, which lets ``difflax-sample`` decode samples to images).
Nothing is downloaded: a tfds dataset must be prepared already.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from difflax.data.encode import encode_dataset, image_dataset
from difflax.hub import ConversionError


def define_flags() -> None:
    """The job's flags, defined when it runs: importing this module defines none."""
    flags.DEFINE_string("vae", None, "diffusers AutoencoderKL folder, or a pipeline root with vae/.", required=True)
    flags.DEFINE_string("out", None, "Directory to write the latents into.", required=True)
    flags.DEFINE_string("dataset", "digits", "'digits' or 'tfds:<tfds name>'.")
    flags.DEFINE_string("split", "train", "Split to encode.")
    flags.DEFINE_integer("image_size", None, "Image height and width (digits: padded; tfds: resized).")
    flags.DEFINE_integer("batch_size", 64, "Images encoded per jitted call.")
    flags.DEFINE_integer("num", None, "Encode only this many records (default: all).")
    flags.DEFINE_bool("sample", False, "Store posterior samples instead of the posterior mode.")
    flags.DEFINE_integer("seed", 0, "Seed of the record order (and of posterior samples).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "Storage dtype of the latents.")
    flags.DEFINE_bool("overwrite", False, "Replace latents already in --out.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        dataset = image_dataset(flags.FLAGS.dataset, flags.FLAGS.split, flags.FLAGS.image_size)
        latents = encode_dataset(
            dataset,
            flags.FLAGS.vae,
            flags.FLAGS.out,
            name=flags.FLAGS.dataset,
            split=flags.FLAGS.split,
            batch_size=flags.FLAGS.batch_size,
            num=flags.FLAGS.num,
            sample=flags.FLAGS.sample,
            seed=flags.FLAGS.seed,
            dtype=flags.FLAGS.dtype,
            overwrite=flags.FLAGS.overwrite,
        )
    except (ConversionError, FileExistsError, FileNotFoundError, ImportError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(f"wrote {latents!r}; train with --config.data.name=latents:{latents.path}")


def run():
    """The console script ``difflax-encode-latents``."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
