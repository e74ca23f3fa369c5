"""Recipe paths of a checkout: ``--config=configs/<recipe>.py`` loads :mod:`difflax.configs.<recipe>`.

The recipes ship in the package (:mod:`difflax.configs`, ``--config=<recipe>``); each file here
re-exports one. ``demo.py`` is the configuration of the solver demo (``experiments/solver_demo.py``).
"""
