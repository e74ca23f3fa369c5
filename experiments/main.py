"""In a checkout, ``python -m experiments.main`` runs :mod:`difflax.cli.train` (``difflax-train``).

The job's file runs as a script rather than being imported: importing ``difflax.cli.train``
would import ``difflax`` (and JAX, seconds) before its early SIGTERM handler is installed.
"""

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).parents[1] / "difflax" / "cli" / "train.py"), run_name="__main__")
