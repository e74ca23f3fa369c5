"""The main job: ``difflax-train [--config=<recipe>|<file>.py] [--workdir=DIR] [--config.key=value ...]``.

Also ``python -m difflax.cli.train`` and, in a checkout, ``python -m experiments.main``. With no
arguments it trains the default recipe (:mod:`difflax.configs.digits`: a small U-Net on the 8x8
digits that ship with scikit-learn), samples with a fast solver, evaluates, and writes to the
work directory: Orbax checkpoints, ``config.json``, ``samples.png`` (generated digits next to
real ones), ``loss.png``, ``metrics.jsonl`` (training log) and ``metrics.json``. ``--config``
takes a recipe name (``toy2d``, ``toy2d:moons`` to pass an argument to its ``get_config``) or
the path of a recipe file. Re-running with the same work directory resumes from the newest
intact checkpoint. SIGTERM at any moment saves what was trained and exits 0; a bad setting, a
busy work directory, a changed recipe or a diverged run exits 1 with a one-line message.
"""

from __future__ import annotations

import signal

# A preemption notice can come while the job is still importing: note it, and hand it to the
# job's handler once that exists. When this file is the program (python -m, experiments/main.py)
# that starts here, before JAX is imported; the console script, once its imports are done.
_EARLY_SIGTERM = []


def _note_sigterm() -> None:
    signal.signal(signal.SIGTERM, lambda signum, frame: _EARLY_SIGTERM.append(signum))


if __name__ == "__main__":
    _note_sigterm()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from difflax.cli.config_flag import define_config_flag  # noqa: E402
from difflax.train import JOB_ERRORS, Preemption, train_and_evaluate  # noqa: E402


def define_flags() -> None:
    """The job's flags, defined when it runs: importing this module defines none."""
    define_config_flag("digits")
    flags.DEFINE_string(
        "workdir", None, "Directory for checkpoints, logs, samples and metrics (default: workdir/<config.name>)."
    )
    flags.DEFINE_bool(
        "allow_recipe_change", False, "Resume the checkpoints of a work directory even if the recipe differs."
    )
    flags.DEFINE_string("coordinator", None, "host:port of process 0 for a multi-process job.")
    flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process job.")
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-process job.")


def recipe_name(config: str) -> str:
    """``toy2d:moons`` or ``configs/toy2d.py:moons`` -> ``toy2d``: a recipe without ``name`` is named by its file."""
    return os.path.splitext(os.path.basename(config.split(":")[0]))[0]


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    logging.set_verbosity(logging.WARNING)
    if FLAGS.coordinator is not None:
        jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    recipe = FLAGS.config.get("name") or recipe_name(config_flags.get_config_filename(FLAGS["config"]))
    workdir = FLAGS.workdir or os.path.join("workdir", recipe)
    preemption = Preemption().install()
    if _EARLY_SIGTERM:
        preemption.request()
    try:
        results = train_and_evaluate(
            FLAGS.config, workdir, preemption=preemption, allow_recipe_change=FLAGS.allow_recipe_change
        )
    except JOB_ERRORS as err:
        sys.exit(f"error: {err}")
    if jax.process_index() == 0:
        print(json.dumps(results, indent=2))
        if results.get("preempted"):
            print(f"preempted during {results['stage']} at step {results['step']}; run again to continue")
        else:
            print(f"wrote {os.path.abspath(workdir)}/samples.png, loss.png and metrics.json")


def run():
    """The console script ``difflax-train``."""
    _note_sigterm()
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
