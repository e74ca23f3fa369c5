"""Teacher trajectories as a dataset: noise, intermediates at chosen steps, final sample.

Offline distillation methods (reflow, Adv-KD, the regression term of DMD, progressive
distillation from stored pairs) train on what a frozen teacher sampler produces from fixed
noise. :func:`teacher_trajectories` runs the sampler once and keeps the states at the
requested grid indices; :func:`save_trajectories` writes them as one ``.npz`` beside the
checkpoints, atomically (a temporary file renamed into place), and
:func:`load_trajectories` reads them back.
"""

from __future__ import annotations

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from difflax.solvers import resolve_grid, resolve_solver, sample

__all__ = ["load_trajectories", "save_trajectories", "teacher_trajectories"]

_KEYS = ("noise", "x0", "times", "intermediates")


def teacher_trajectories(
    denoise, process, x_T, *, steps: int, save_steps=(), solver="ddim", grid=None, key=None, **solver_args
) -> dict:
    """Sample from ``x_T`` with the teacher and keep the states after the given steps.

    Args:
      denoise: the teacher denoiser.
      process: its forward process.
      x_T: starting noise ``(batch, ...)``.
      steps: number of sampler steps (static).
      save_steps: grid indices whose state is kept: ``0`` is ``x_T`` at ``ts[0]``, ``k`` is the
        state at ``ts[k]`` after ``k`` steps, ``steps`` is the final sample.
      solver, grid, key, **solver_args: as for :func:`difflax.sample`.

    Returns:
      ``{"noise": x_T, "x0": final sample, "times": ts[save_steps],
      "intermediates": states[save_steps]}`` with ``intermediates`` of shape
      ``(len(save_steps), batch, ...)``.
    """
    save = np.asarray(save_steps, dtype=np.int32).reshape(-1)
    if save.size and (save.min() < 0 or save.max() > steps):
        raise ValueError(f"save_steps must lie in [0, steps={steps}]; got {save.tolist()}.")
    solver_obj = resolve_solver(solver, solver_args)
    ts, final_zero = resolve_grid(grid, solver_obj, process, steps, None)
    x0, info = sample(
        denoise,
        process,
        x_T,
        solver=solver_obj,
        steps=steps,
        grid=ts,
        key=key,
        return_trajectory=True,
        final_zero=final_zero,
    )
    traj = info["trajectory"]
    return {
        "noise": x_T,
        "x0": x0,
        "times": jnp.asarray(ts)[save],
        "intermediates": traj[save],
    }


def save_trajectories(path: str, data: dict) -> str:
    """Write ``data`` (the dict of :func:`teacher_trajectories`) to ``path`` atomically.

    The arrays go to a temporary file in the same directory, which is then renamed over
    ``path``: a reader never sees a half-written file, and an interrupted write leaves the
    previous file intact.
    """
    missing = [k for k in _KEYS if k not in data]
    if missing:
        raise ValueError(f"data must have the keys {_KEYS}; missing {missing}.")
    path = os.path.abspath(path if path.endswith(".npz") else path + ".npz")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arrays = {k: np.asarray(jax.device_get(v)) for k, v in data.items()}
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load_trajectories(path: str) -> dict:
    """Read a file written by :func:`save_trajectories` into a dict of numpy arrays."""
    path = path if path.endswith(".npz") else path + ".npz"
    if not os.path.exists(path):
        raise FileNotFoundError(f"no trajectory file at {path}; write one with save_trajectories.")
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    missing = [k for k in _KEYS if k not in data]
    if missing:
        raise ValueError(f"{path} is not a trajectory file: missing {missing}.")
    return data
