"""Sample from a training run: ``python -m experiments.sample --workdir=DIR [--step=N|best|latest] [...]``.

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

from difflax.train import JOB_ERRORS
from difflax.train.runs import sample_run

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's work directory.", required=True)
_STEP = flags.DEFINE_string("step", "latest", "Checkpoint: 'latest', 'best' or a step number.")
_SOLVER = flags.DEFINE_string("solver", None, "Solver name (default: the recipe's sample.solver).")
_STEPS = flags.DEFINE_integer("steps", None, "Number of steps (default: sample.steps).")
_GRID = flags.DEFINE_string("grid", None, "Time grid (default: sample.grid).")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale (1: none).")
_NUM = flags.DEFINE_integer("num", 100, "Number of samples.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the noise.")
_TRAJECTORY = flags.DEFINE_bool("trajectory", False, "Also write an animated GIF of the sampling path.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        paths = sample_run(_WORKDIR.value, _STEP.value, solver=_SOLVER.value, steps=_STEPS.value, grid=_GRID.value,
                           guidance_scale=_GUIDANCE.value, num=_NUM.value, seed=_SEED.value,
                           trajectory=_TRAJECTORY.value)
    except (*JOB_ERRORS, FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    for path in paths.values():
        print(f"wrote {os.path.abspath(path)}")


if __name__ == "__main__":
    app.run(main)
