"""Reflow / rectified flow (Liu, Gong & Liu 2023, "Flow straight and fast").

Given a coupling ``(x0, x1)`` made by a teacher's deterministic sampler (``x1`` the
noise it started from, ``x0`` the sample it produced; :func:`difflax.distill.teacher_trajectories`
makes them), the next flow is trained with the flow-matching loss on the *coupled* pairs,

    L = E_t || v(x_t, t) - (x1 - x0) ||^2,   x_t = (1 - t) x0 + t x1,

whose minimizer transports the same marginals with straighter paths, so it samples
well in fewer Euler steps. Straightness of a flow (Liu et al., def. 3.5) is

    S = int_0^1 E || (X_1 - X_0) - dX_tau / dtau ||^2 dtau

(zero iff every path is a straight line at constant speed), measured by
:func:`straightness` on a fine sampled trajectory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from difflax.losses import denoising_loss
from difflax.parametrization import denoiser_to
from difflax.processes import Flow

__all__ = ["reflow_loss", "straightness"]


def reflow_loss(student, x0, z, key, *, process=None, weighting: str = "simple"):
    """Per-example flow-matching loss of the denoiser ``student`` on coupled pairs ``(x0, z)``.

    ``z`` is the standard-normal draw the teacher's sample ``x0`` came from (its starting
    noise divided by ``sigma(t_max)``). With ``x_t = alpha_t x0 + sigma_t z`` and
    ``t ~ U[t_min, t_max]``, the student is read as a velocity model
    (:func:`difflax.parametrization.denoiser_to`) and scored by
    :func:`difflax.losses.denoising_loss` on the velocity; for the default
    :class:`~difflax.processes.Flow` and ``weighting="simple"`` this is ``|v - (z - x0)|^2``.
    """
    process = Flow() if process is None else process
    if z.shape != x0.shape:
        raise ValueError(f"z must have the shape of x0 {x0.shape}; got {z.shape}.")
    t = jax.random.uniform(key, (x0.shape[0],), x0.dtype, process.t_min, process.t_max)
    velocity = denoiser_to(student, process, "velocity")
    return denoising_loss(velocity, process, x0, t, z, prediction="velocity", weighting=weighting)


def straightness(trajectory, ts):
    """Straightness ``S`` of sampled paths (Liu et al. 2023, def. 3.5), per example.

    Args:
      trajectory: ``(steps + 1, batch, ...)`` states along decreasing times ``ts`` (e.g.
        ``info["trajectory"]`` of :func:`difflax.sample` with ``return_trajectory=True``).
      ts: the ``steps + 1`` times; the path is reparametrized to ``tau in [0, 1]``
        proportional to ``t``.

    Returns:
      ``(batch,)``: ``sum_k dtau_k mean|(X_end - X_start) - (X_{k+1} - X_k) / dtau_k|^2``,
      the mean over dimensions of the integrand; 0 for straight constant-speed paths.
    """
    ts = jnp.asarray(ts)
    if trajectory.shape[0] != ts.shape[0]:
        raise ValueError(f"trajectory has {trajectory.shape[0]} states but ts has {ts.shape[0]} times.")
    dtau = jnp.abs(jnp.diff(ts)) / jnp.abs(ts[-1] - ts[0])
    batch = trajectory.shape[1]
    flat = trajectory.reshape(trajectory.shape[0], batch, -1)
    chord = flat[-1] - flat[0]
    speed = jnp.diff(flat, axis=0) / dtau[:, None, None]
    return jnp.sum(dtau[:, None] * jnp.mean((speed - chord[None]) ** 2, axis=2), axis=0)
