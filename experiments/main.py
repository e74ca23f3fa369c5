"""The main job: ``python -m experiments.main [--config=configs/<recipe>.py] [--workdir=DIR] [--config.key=value]``.

With no arguments it trains the default recipe (``configs/digits.py``: a small U-Net on
the 8x8 digits that ship with scikit-learn), samples with a fast solver, evaluates, and
writes to the work directory: Orbax checkpoints, ``samples.png`` (generated digits next to
real ones), ``loss.png``, ``metrics.jsonl`` (training log) and ``metrics.json``. Re-running
with the same work directory resumes from the latest checkpoint; SIGTERM saves and exits 0.
"""

from __future__ import annotations

import json
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from difflax.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "digits.py"), "Recipe file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/digits", "Directory for checkpoints, logs, samples and metrics.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 for a multi-process job.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process job.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if _COORDINATOR.value is not None:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    results = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if jax.process_index() == 0:
        print(json.dumps(results, indent=2))
        if not results.get("preempted"):
            print(f"wrote {os.path.abspath(_WORKDIR.value)}/samples.png, loss.png and metrics.json")


if __name__ == "__main__":
    app.run(main)
