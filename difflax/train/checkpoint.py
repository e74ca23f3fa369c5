"""Orbax checkpoints: asynchronous, atomic, keep-last-N plus best-by-metric, resumable.

A checkpoint holds the :class:`~difflax.train.state.TrainState` and a JSON item with the
data position and the recipe. Orbax writes each step to a temporary directory and
renames it when complete, so a run killed in the middle of a save resumes from the last
complete checkpoint.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

__all__ = ["CheckpointError", "Checkpointer"]


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be used (unreadable, corrupt or incompatible)."""


class Checkpointer:
    """Thin wrapper of ``ocp.CheckpointManager`` for training states.

    Args:
      directory: where checkpoints live (created if missing).
      keep: how many of the latest checkpoints to keep.
      keep_best: also keep this many best checkpoints by ``best_metric`` (lower is better).
      best_metric: the metric name ranking checkpoints.
      async_save: save in a background thread (``wait()`` blocks until done).
    """

    def __init__(self, directory: str, keep: int = 3, keep_best: int = 1, best_metric: str = "loss",
                 async_save: bool = True):
        self.directory = os.path.abspath(directory)
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(f"checkpoint directory {self.directory} exists and is not a directory.")
        policies = [cm.LatestN(n=keep)]
        if keep_best:
            policies.append(cm.BestN(get_metric_fn=lambda m: m[best_metric], reverse=True, n=keep_best))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=cm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self):
        return list(self._manager.all_steps())

    def save(self, step: int, state, meta: dict, metrics: dict | None = None, force: bool = False) -> bool:
        return self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics=metrics,
            force=force,
        )

    def restore(self, abstract_state, step: int | None = None):
        """``(state, meta)`` of ``step`` (default: the latest) laid out like ``abstract_state``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint found in {self.directory}.")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
            )
        except Exception as err:  # orbax raises many types for unreadable data
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} cannot be restored ({type(err).__name__}: {err}). "
                "Point --workdir at a fresh directory or remove the damaged step; nothing was overwritten."
            ) from err
        return restored.state, restored.meta

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.close()
