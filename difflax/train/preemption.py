"""Preemption: one SIGTERM handler for the whole job, and a stop step that every process agrees on.

A scheduler that preempts a job sends SIGTERM, waits a grace period, then kills it. The
training loop asks :meth:`Preemption.reached` at the top of every step; when it answers
``True`` the loop saves (if the step is not saved yet) and returns, and the job exits 0.

* **One process.** A Python SIGTERM handler sets a flag; ``reached`` reads it.
* **Several processes** (after ``jax.distributed.initialize``). A signal reaches one host,
  but the hosts must stop at the same step: a host that stops alone leaves the others
  blocked in the next all-reduce. JAX's preemption service (on by default) owns SIGTERM
  there: its notifier tells the coordination service, which picks the step after the
  furthest host's, and ``multihost_utils.reached_preemption_sync_point`` answers ``True``
  at that step on every host, so all of them save the same checkpoint.

:meth:`Preemption.request` records a notice that arrived before the handler existed (the
entry point installs a bare flag first thing, before importing JAX) and forwards it to the
preemption service in a multi-process job.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

__all__ = ["Preemption"]


class Preemption:
    """Whether the job has been asked to stop, and the step at which to stop."""

    def __init__(self):
        self._requested = False
        self._previous = None
        self._installed = False
        self.multiprocess = jax.process_count() > 1
        if self.multiprocess and not jax.config.jax_enable_preemption_service:
            raise RuntimeError(
                "a multi-process job needs JAX's preemption service to stop every process at the same "
                "step on SIGTERM; do not set jax_enable_preemption_service=False."
            )

    @property
    def installed(self) -> bool:
        """Whether this object's SIGTERM handler is in place."""
        return self._installed

    def install(self) -> Preemption:
        """Handle SIGTERM from now on (one process, main thread; the preemption service does it otherwise)."""
        if not self.multiprocess and not self._installed and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
            self._installed = True
        return self

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _on_signal(self, signum, frame):
        del signum, frame
        self._requested = True

    def request(self) -> None:
        """Record a preemption notice (e.g. one the entry point caught before this object existed)."""
        if self.multiprocess:
            os.kill(os.getpid(), signal.SIGTERM)  # to the preemption service's notifier
        else:
            self._requested = True

    def requested(self) -> bool:
        """Whether this process has had a notice (single process; a multi-process job finishes evaluation)."""
        return self._requested

    def reached(self, step: int) -> bool:
        """Whether to stop before training ``step``; the same answer on every process.

        Must be called at every step, with increasing ``step``, by every process.
        """
        if self.multiprocess:
            return multihost_utils.reached_preemption_sync_point(int(step))
        return self._requested
