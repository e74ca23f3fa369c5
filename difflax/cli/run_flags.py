"""The flags of the jobs that read a finished run (``difflax-sample``, ``difflax-evaluate``): which run, which
checkpoint, and the sampler that overrides the recipe's."""

from __future__ import annotations

from absl import flags

__all__ = ["define_run_flags", "sampler_overrides"]


def define_run_flags() -> None:
    """``--workdir``, ``--step`` and the sampler overrides ``--solver/--steps/--grid/--guidance_scale``."""
    flags.DEFINE_string("workdir", None, "The training run's work directory.", required=True)
    flags.DEFINE_string("step", "latest", "Checkpoint: 'latest', 'best' or a step number.")
    flags.DEFINE_string("solver", None, "Solver name (default: the recipe's sample.solver).")
    flags.DEFINE_integer("steps", None, "Number of steps (default: sample.steps).")
    flags.DEFINE_string("grid", None, "Time grid (default: sample.grid).")
    flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale (1: none).")


def sampler_overrides() -> dict:
    """The sampler flags as keyword arguments of :func:`difflax.train.runs.sample_run` / ``evaluate_run``."""
    names = ("solver", "steps", "grid", "guidance_scale")
    return {name: flags.FLAGS[name].value for name in names}
