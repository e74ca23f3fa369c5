"""Train a small latent diffusion autoencoder and save it as a diffusers ``AutoencoderKL`` folder.

``difflax-train-vae --out=DIR [--dataset=digits|tfds:<name>] [--image_size=16] [--steps=2000] [...]``

The folder is what ``difflax-encode-latents --vae=DIR`` reads, so latent diffusion runs end to end
without a downloaded VAE (:mod:`difflax.configs.digits_latent`). The model is
:class:`~difflax.models.AutoencoderKL` at the size the flags give, trained by
:func:`~difflax.train.autoencoder.fit_autoencoder`; the job prints the reconstruction RMSE on the
``--eval_split`` images (in the ``[-1, 1]`` pixel range) and the fitted ``scaling_factor``.
Nothing is downloaded: a tfds dataset must be prepared already.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from absl import app, flags, logging

from difflax.data.encode import image_dataset
from difflax.hub import ConversionError, save_autoencoder_kl
from difflax.models import AutoencoderKL
from difflax.train.autoencoder import fit_autoencoder


def define_flags() -> None:
    """The job's flags, defined when it runs: importing this module defines none."""
    flags.DEFINE_string("out", None, "Folder to write the VAE into (must not exist).", required=True)
    flags.DEFINE_string("dataset", "digits", "'digits' or 'tfds:<tfds name>'.")
    flags.DEFINE_string("split", "train", "Split to train on.")
    flags.DEFINE_string("eval_split", "test", "Split the reconstruction error is reported on.")
    flags.DEFINE_integer("image_size", 16, "Image height and width (digits: padded; tfds: resized).")
    flags.DEFINE_list("block_out_channels", ["32", "64"], "Widths of the levels; the latent is 2^(levels-1) smaller.")
    flags.DEFINE_integer("layers_per_block", 1, "Residual blocks per level.")
    flags.DEFINE_integer("latent_channels", 4, "Channels of the latent.")
    flags.DEFINE_integer("norm_num_groups", 16, "GroupNorm groups (must divide every width).")
    flags.DEFINE_integer("steps", 2000, "Optimizer steps.")
    flags.DEFINE_integer("batch_size", 64, "Images per step.")
    flags.DEFINE_float("learning_rate", 1e-3, "Adam step size (warm-up, then cosine decay).")
    flags.DEFINE_float("beta", 1e-6, "Weight of the KL term.")
    flags.DEFINE_integer("seed", 0, "Seed of the initialisation, posterior samples and data order.")


def reconstruction_rmse(model: AutoencoderKL, params, dataset, batch_size: int = 256) -> float:
    """RMSE of ``decode(mode(encode(x)))`` against ``x`` over every record of ``dataset`` (one pass, seed 0)."""
    reconstruct = jax.jit(lambda x: model.apply({"params": params}, x)[0])
    total, squared = len(dataset), 0.0
    for step, start in enumerate(range(0, total, batch_size)):
        x = np.asarray(dataset.batch(0, step, batch_size)["x"], np.float32)[: total - start]
        squared += float(np.sum(np.square(np.asarray(reconstruct(x)) - x)))
    return float(np.sqrt(squared / (total * np.prod(dataset.example_shape))))


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    try:
        dataset = image_dataset(f.dataset, f.split, f.image_size)
        model = AutoencoderKL(block_out_channels=tuple(int(c) for c in f.block_out_channels),
                              layers_per_block=f.layers_per_block, latent_channels=f.latent_channels,
                              out_channels=dataset.example_shape[-1], norm_num_groups=f.norm_num_groups)
        model, params, history = fit_autoencoder(model, dataset, steps=f.steps, batch_size=f.batch_size,
                                                 learning_rate=f.learning_rate, beta=f.beta, seed=f.seed,
                                                 progress=True)
        rmse = reconstruction_rmse(model, params, image_dataset(f.dataset, f.eval_split, f.image_size))
        path = save_autoencoder_kl(model, params, f.out, sample_size=f.image_size)
    except (ConversionError, FileExistsError, FileNotFoundError, ImportError, ValueError) as err:
        sys.exit(f"error: {err}")
    last = history[-1]
    print(f"wrote {path}: loss {last['loss']:.4g} (reconstruction {last['reconstruction']:.4g}, kl {last['kl']:.4g}) "
          f"after {last['step']} steps, {f.eval_split} reconstruction RMSE {rmse:.4f}, "
          f"scaling_factor {model.scaling_factor:.4f}")


def run():
    """The console script ``difflax-train-vae``."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
