"""The main job: ``python -m experiments.main [--config=configs/<recipe>.py] [--workdir=DIR] [--config.key=value]``.

With no arguments it trains the default recipe (``configs/digits.py``: a small U-Net on
the 8x8 digits that ship with scikit-learn), samples with a fast solver, evaluates, and
writes to the work directory: Orbax checkpoints, ``config.json``, ``samples.png``
(generated digits next to real ones), ``loss.png``, ``metrics.jsonl`` (training log) and
``metrics.json``. Re-running with the same work directory resumes from the newest intact
checkpoint. SIGTERM at any moment saves what was trained and exits 0; a bad setting, a
busy work directory, a changed recipe or a diverged run exits 1 with a one-line message.
"""

from __future__ import annotations

import signal

# A preemption notice can come while the libraries below are still importing: note it now,
# hand it to the job's handler once that exists.
_EARLY_SIGTERM = []
signal.signal(signal.SIGTERM, lambda signum, frame: _EARLY_SIGTERM.append(signum))

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from difflax.train import JOB_ERRORS, Preemption, train_and_evaluate  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "digits.py"), "Recipe file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, logs, samples and metrics (default: workdir/<config.name>)."
)
_ALLOW_RECIPE_CHANGE = flags.DEFINE_bool(
    "allow_recipe_change", False, "Resume the checkpoints of a work directory even if the recipe differs."
)
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 for a multi-process job.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process job.")


def recipe_name(config_file: str) -> str:
    """``configs/toy2d.py:moons`` -> ``toy2d``: a recipe without ``name`` is named by its file."""
    return os.path.splitext(os.path.basename(config_file.split(":")[0]))[0]


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if _COORDINATOR.value is not None:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    recipe = _CONFIG.value.get("name") or recipe_name(config_flags.get_config_filename(flags.FLAGS["config"]))
    workdir = _WORKDIR.value or os.path.join("workdir", recipe)
    preemption = Preemption().install()
    if _EARLY_SIGTERM:
        preemption.request()
    try:
        results = train_and_evaluate(
            _CONFIG.value, workdir, preemption=preemption, allow_recipe_change=_ALLOW_RECIPE_CHANGE.value
        )
    except JOB_ERRORS as err:
        sys.exit(f"error: {err}")
    if jax.process_index() == 0:
        print(json.dumps(results, indent=2))
        if results.get("preempted"):
            print(f"preempted during {results['stage']} at step {results['step']}; run again to continue")
        else:
            print(f"wrote {os.path.abspath(workdir)}/samples.png, loss.png and metrics.json")


if __name__ == "__main__":
    app.run(main)
