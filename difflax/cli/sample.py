"""Sample from a training run: ``difflax-sample --workdir=DIR [--step=N|best|latest] [...]``.

Reads the run's ``config.json`` and a checkpoint (the EMA parameters), samples with the
recipe's sampler or the one given by ``--solver/--steps/--grid/--guidance_scale``, and
writes into ``DIR/samples/``: a PNG (an image grid, classes in columns, or a 2-D scatter, beside
real data), an ``.npz`` of the samples (and labels), and with ``--trajectory`` an animated
GIF of the sampling path.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from difflax.cli.run_flags import define_run_flags, sampler_overrides
from difflax.train import JOB_ERRORS
from difflax.train.runs import sample_run


def define_flags() -> None:
    """The job's flags, defined when it runs: importing this module defines none."""
    define_run_flags()
    flags.DEFINE_integer("num", 100, "Number of samples.")
    flags.DEFINE_integer("seed", 0, "Seed of the noise.")
    flags.DEFINE_bool("trajectory", False, "Also write an animated GIF of the sampling path.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        paths = sample_run(
            flags.FLAGS.workdir,
            flags.FLAGS.step,
            **sampler_overrides(),
            num=flags.FLAGS.num,
            seed=flags.FLAGS.seed,
            trajectory=flags.FLAGS.trajectory,
        )
    except (*JOB_ERRORS, FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    for path in paths.values():
        print(f"wrote {os.path.abspath(path)}")


def run():
    """The console script ``difflax-sample``."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
