"""Orbax checkpoints: asynchronous, atomic, verified, keep-last-N plus best-by-metric, resumable.

A checkpoint holds the :class:`~difflax.train.state.TrainState` and a JSON item with the
data position, the recipe and a CRC-32 of every array. Orbax writes each step to a
temporary directory and renames it when complete, so a run killed in the middle of a save
resumes from the last complete checkpoint. Three guarantees on top of Orbax:

* **Nothing non-finite is written.** :meth:`Checkpointer.save` refuses a state with a NaN
  or an infinity, so a diverging run can never push its last good checkpoints out.
* **Retention holds across restarts.** The metric that ranks checkpoints is written with
  each of them (the manager's ``best_fn``), so a new manager over an old directory applies
  the same keep-latest / keep-best policy instead of keeping every older step.
* **Damage is detected and survived.** Restoring compares every array with the checksum
  saved beside it (a flipped bit does not load silently); :meth:`Checkpointer.restore_intact`
  falls back to the newest intact step, warns naming the damaged one, and moves it to
  ``<directory>.damaged/`` (kept, not deleted) so that training can write that step again.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as cm

__all__ = ["CheckpointError", "Checkpointer", "NonFiniteStateError", "all_finite", "checksums"]

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be used (unreadable, corrupt or incompatible)."""


class NonFiniteStateError(CheckpointError):
    """A state holding NaN or infinity was about to be saved."""


@jax.jit
def _finite_flags(tree):
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]) if leaves else jnp.ones((0,), bool)


def all_finite(tree) -> bool:
    """Whether every floating-point array of ``tree`` is finite (one jitted reduction, any sharding)."""
    return bool(np.all(np.asarray(jax.device_get(_finite_flags(tree)))))


def _host_copy(x) -> np.ndarray | None:
    """This process's full copy of ``x`` (replicated or fully addressable), else ``None``."""
    if isinstance(x, jax.Array):
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x) if x.is_fully_addressable else None
    return np.asarray(x)


def checksums(tree) -> dict[str, int]:
    """CRC-32 of the bytes of every array of ``tree`` this process holds in full, by key path."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        host = _host_copy(leaf)
        if host is not None:
            out[jax.tree_util.keystr(path)] = zlib.crc32(np.ascontiguousarray(host).tobytes())
    return out


class Checkpointer:
    """``ocp.CheckpointManager`` for training states, with the guarantees of the module docstring.

    Args:
      directory: where checkpoints live (created if missing).
      keep: how many of the latest checkpoints to keep.
      keep_best: also keep this many best checkpoints by ``best_metric`` (lower is better).
      best_metric: the metric name ranking checkpoints; every save must pass it in ``metrics``.
      async_save: save in a background thread (``wait()`` blocks until done).
    """

    def __init__(self, directory: str, keep: int = 3, keep_best: int = 1, best_metric: str = "loss",
                 async_save: bool = True):
        self.directory = os.path.abspath(directory)
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(f"checkpoint directory {self.directory} exists and is not a directory.")
        self.best_metric = best_metric
        self.keep_best = keep_best
        policies = [cm.LatestN(n=keep)]
        if keep_best:
            policies.append(cm.BestN(get_metric_fn=self._metric, reverse=True, n=keep_best,
                                     keep_checkpoints_without_metrics=False))
        self._options = ocp.CheckpointManagerOptions(
            preservation_policy=cm.AnyPreservationPolicy(policies),
            best_fn=self._metric if keep_best else None,  # writes the metrics to disk with each step
            best_mode="min",
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = self._open()

    def _metric(self, metrics) -> float:
        return float(metrics[self.best_metric])

    def _open(self):
        return ocp.CheckpointManager(self.directory, options=self._options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the lowest ranking metric (``None`` without ``keep_best`` or checkpoints)."""
        return self._manager.best_step() if self.keep_best else None

    def all_steps(self):
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, meta: dict, metrics: dict | None = None) -> None:
        """Write ``state`` and ``meta`` (plus the arrays' checksums) as ``step``.

        Raises :class:`NonFiniteStateError` (and writes nothing) if any array of ``state`` is
        not finite, and ``ValueError`` if ``metrics`` lacks the ranking metric.
        """
        if not all_finite(state):
            raise NonFiniteStateError(
                f"refusing to save step {step}: the state holds NaN or infinity; the checkpoints in "
                f"{self.directory} ({self.all_steps()}) are left as they were."
            )
        if self.keep_best and (metrics is None or self.best_metric not in metrics):
            raise ValueError(f"metrics must include {self.best_metric!r} to rank checkpoints; got {metrics!r}.")
        meta = {**meta, "checksums": checksums(state)}
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics=metrics,
            force=True,
        )

    def restore(self, abstract_state, step: int | None = None):
        """``(state, meta)`` of ``step`` (default: the latest), laid out like ``abstract_state``.

        Raises :class:`CheckpointError` if the step cannot be read or an array does not match
        its saved checksum.
        """
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
                f"checkpoint {step} in {self.directory} cannot be restored ({type(err).__name__}: "
                f"{str(err)[:300]})."
            ) from err
        expected = restored.meta.get("checksums")
        if expected is not None:
            found = checksums(restored.state)
            bad = [k for k, v in found.items() if k in expected and expected[k] != v]
            if bad:
                raise CheckpointError(
                    f"checkpoint {step} in {self.directory} is damaged: {len(bad)} array(s) do not match "
                    f"their saved checksums ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})."
                )
        return restored.state, restored.meta

    def read_meta(self, step: int) -> dict | None:
        """The JSON item of ``step`` alone (cheap: no arrays), or ``None`` if it cannot be read."""
        try:
            return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception:  # an unreadable item: restore() reports it in full
            return None

    def restore_intact(self, abstract_state):
        """``(state, meta)`` of the newest step that restores and verifies.

        Newer steps that fail (unreadable, or an array that does not match its checksum) are
        reported with a warning naming each and are moved to ``<directory>.damaged/<step>-<time>``
        (process 0 moves them; all processes wait), so the run resumes from the intact step
        and can write those step numbers again. If no step restores, nothing is moved (the
        checkpoints may belong to another recipe rather than be damaged) and
        :class:`CheckpointError` reports the newest step's error.
        """
        failed = []
        for step in reversed(self.all_steps()):
            try:
                state, meta = self.restore(abstract_state, step)
            except CheckpointError as err:
                failed.append((step, err))
                continue
            for bad, err in failed:
                log.warning("%s Moved it to %s; resuming from step %d.", err, self._set_aside(bad), step)
            return state, meta
        if not failed:
            raise CheckpointError(f"no checkpoint found in {self.directory}.")
        raise CheckpointError(
            f"no checkpoint in {self.directory} restores (steps {[s for s, _ in failed]}, nothing was moved); "
            f"the newest: {failed[0][1]} If they belong to another recipe, choose another --workdir."
        )

    def _set_aside(self, step: int) -> str:
        target = os.path.join(f"{self.directory}.damaged", f"{step}-{int(time.time())}")
        multihost_utils.sync_global_devices(f"difflax_set_aside_{step}_before")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), target)
        multihost_utils.sync_global_devices(f"difflax_set_aside_{step}_after")
        self._manager.close()
        self._manager = self._open()
        return target

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.close()
