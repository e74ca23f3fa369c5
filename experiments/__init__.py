"""Checkout paths of the jobs: ``python -m experiments.<name>`` runs :mod:`difflax.cli` (``main`` is ``train``).

``solver_demo`` lives only here: a demonstration on an exact denoiser, not a job on a run.
"""
