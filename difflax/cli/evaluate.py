"""Evaluate a training run: ``difflax-evaluate --workdir=DIR [--step=...] [--seeds=0,1,2] [...]``.

The seeded protocol of :func:`difflax.train.runs.evaluate_run`: for each seed, draw
``--num_samples`` samples with the recipe's sampler (or ``--solver/--steps/--grid/
--guidance_scale``) from a checkpoint's EMA parameters, map them to the data's features and
score them (digits: Frechet digits distance, KID, precision/recall, class accuracy; 2-D data:
the same on the points plus the sliced Wasserstein distance; other images: FID with local
Inception weights, ``--inception`` and ``--reference_stats``); mean +- std over the seeds
goes to ``DIR/eval.json``.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from difflax.cli.run_flags import define_run_flags, sampler_overrides
from difflax.train import JOB_ERRORS
from difflax.train.runs import evaluate_run


def define_flags() -> None:
    """The job's flags, defined when it runs: importing this module defines none."""
    define_run_flags()
    flags.DEFINE_list("seeds", ["0", "1", "2"], "One full evaluation per seed.")
    flags.DEFINE_integer("num_samples", 1000, "Samples per seed.")
    flags.DEFINE_integer("batch_size", 500, "Samples per jitted batch.")
    flags.DEFINE_string("inception", None, "Local Inception weights (.npz) for FID on image datasets.")
    flags.DEFINE_string("reference_stats", None, "Reference feature statistics (.npz) for FID.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        report = evaluate_run(
            flags.FLAGS.workdir,
            flags.FLAGS.step,
            **sampler_overrides(),
            seeds=flags.FLAGS.seeds,
            num_samples=flags.FLAGS.num_samples,
            batch_size=flags.FLAGS.batch_size,
            inception=flags.FLAGS.inception,
            reference_stats=flags.FLAGS.reference_stats,
        )
    except (*JOB_ERRORS, FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    for name, m in report["metrics"].items():
        print(f"{name:>20}: {m['mean']:.5g} +- {m['std']:.2g}  ({len(m['per_seed'])} seeds)")
    print(f"wrote {os.path.join(os.path.abspath(flags.FLAGS.workdir), 'eval.json')}")


def run():
    """The console script ``difflax-evaluate``."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
