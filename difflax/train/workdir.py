"""One owner per work directory, and one recipe per run.

* :class:`WorkdirLock`: a ``LOCK`` file created exclusively (``O_CREAT | O_EXCL``) holding
  the owner's host, pid and start time, refreshed by a heartbeat thread. A second job on the
  directory is refused with a message naming the owner. A lock is stale, and taken over
  with a warning, when its owner ran on this host and its pid is gone (or is this process's
  own pid: a restarted container reuses pids), or when its heartbeat is older than
  ``stale_after`` seconds (an owner on another host that died without releasing it). In a
  multi-process job process 0 holds the lock and tells the others whether it got it.
* :func:`check_recipe`: the resolved config is saved as ``config.json``; resuming a run whose
  checkpoints were written under a different recipe is refused with the differing keys,
  except for keys meant to change on resume (:data:`RESUMABLE_KEYS`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

__all__ = ["RESUMABLE_KEYS", "RecipeMismatch", "WorkdirBusy", "WorkdirLock", "check_recipe", "write_json"]

log = logging.getLogger(__name__)

LOCK = "LOCK"
CONFIG = "config.json"
#: Config keys (or key prefixes ending in ".") that may differ when a run is resumed.
RESUMABLE_KEYS = (
    "train.steps", "train.log_every", "train.save_every", "train.keep", "train.keep_best",
    "train.async_checkpoint", "sample.", "eval.",
    # The layout of the state, not its values: checkpoints restore onto another mesh.
    "mesh.", "partition_rules",
)


class WorkdirBusy(RuntimeError):
    """Another live job owns the work directory."""


class RecipeMismatch(ValueError):
    """The work directory holds checkpoints of another recipe."""


def write_json(path: str, value) -> None:
    """Write ``value`` as JSON to ``path`` atomically (a complete file or the previous one)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class WorkdirLock:
    """Exclusive ownership of ``workdir`` for the life of a job (a context manager)."""

    def __init__(self, workdir: str, *, stale_after: float = 120.0, heartbeat: float = 20.0):
        self.path = os.path.join(os.path.abspath(workdir), LOCK)
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self._stop = threading.Event()
        self._thread = None
        self.owned = False

    def __enter__(self) -> WorkdirLock:
        message = ""
        if jax.process_index() == 0:
            message = self._acquire()
        if jax.process_count() > 1:
            ok = multihost_utils.broadcast_one_to_all(np.int32(message == ""))
            if not int(ok) and not message:
                message = f"process 0 could not lock the work directory {os.path.dirname(self.path)}."
        if message:
            raise WorkdirBusy(message)
        return self

    def __exit__(self, *exc):
        self.release()

    def _owner(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}

    def _acquire(self) -> str:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                why = self._stale_reason()
                if why is None:
                    return self._busy_message()
                log.warning("taking over the stale lock %s (%s).", self.path, why)
                with contextlib.suppress(FileNotFoundError):  # another job may have removed it first
                    os.remove(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._owner(), f)
            self.owned = True
            self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
            self._thread.start()
            return ""
        return self._busy_message()

    def _read(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _stale_reason(self) -> str | None:
        owner = self._read()
        try:
            age = time.time() - os.path.getmtime(self.path)
        except FileNotFoundError:
            return "it was just released"
        if owner.get("host") == socket.gethostname():
            pid = owner.get("pid")
            if pid == os.getpid():
                return f"it names this process's pid {pid}, left by an earlier run"
            if not isinstance(pid, int) or not _pid_alive(pid):
                return f"its owner, pid {pid} on this host, is gone"
        if age > self.stale_after:
            return f"no heartbeat for {age:.0f} s (more than {self.stale_after:.0f} s)"
        return None

    def _busy_message(self) -> str:
        owner = self._read()
        started = owner.get("started")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "an unknown time"
        try:
            beat = f"{time.time() - os.path.getmtime(self.path):.0f} s ago"
        except FileNotFoundError:
            beat = "never"
        return (
            f"work directory {os.path.dirname(self.path)} is in use by pid {owner.get('pid')} on host "
            f"{owner.get('host')} (started {since}, last heartbeat {beat}). Wait for that job or choose "
            f"another --workdir; if that job is gone, delete {self.path}."
        )

    def _beat(self):
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        """Give the directory up (only if this process holds it)."""
        if not self.owned:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._read().get("pid") == os.getpid():
            os.remove(self.path)
        self.owned = False


def _flatten(tree, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)


def check_recipe(config, workdir: str, *, has_checkpoints: bool, allow_change: bool = False) -> None:
    """Refuse to resume checkpoints written under another recipe; then save ``config.json``.

    Compares the recipe with ``workdir/config.json`` when the directory already holds
    checkpoints. Keys in :data:`RESUMABLE_KEYS` may differ; any other difference raises
    :class:`RecipeMismatch` naming the keys, unless ``allow_change``. Process 0 writes the
    (new) config atomically.
    """
    path = os.path.join(workdir, CONFIG)
    current = json.loads(config.to_json_best_effort())
    if has_checkpoints and os.path.exists(path) and not allow_change:
        with open(path) as f:
            saved = _flatten(json.load(f))
        now = _flatten(current)
        keys = sorted(k for k in set(saved) | set(now) if saved.get(k, "<absent>") != now.get(k, "<absent>")
                      and not _resumable(k))
        if keys:
            names = saved.get("name"), now.get("name")
            which = f"recipe {names[0]!r}, not {names[1]!r}" if names[0] != names[1] else "another recipe"
            diffs = "; ".join(f"{k}: {saved.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}" for k in keys[:8])
            more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
            raise RecipeMismatch(
                f"{workdir} holds checkpoints of {which} ({diffs}{more}). Choose another --workdir, or "
                "pass --allow_recipe_change to resume these checkpoints under the new recipe."
            )
    if jax.process_index() == 0:
        write_json(path, current)
