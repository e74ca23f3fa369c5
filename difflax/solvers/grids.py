"""Time grids ``grid(process, steps) -> t[steps + 1]``, from ``t_max`` down to ``t_min`` or ``0``.

With ``final_zero=True`` (the default) the grid holds ``steps`` positive times from
``t_max`` to ``t_min`` followed by an exact ``0``: samplers read the last interval as
the final denoising step ``x <- D(x, t_min)`` (one evaluation), which for every ODE
solver is the limit of its own step to ``sigma = 0`` (Karras et al. 2022, alg. 1; the
"denoise to zero" of DPM-Solver and score_sde). With ``final_zero=False`` the
``steps + 1`` times all lie in ``[t_min, t_max]``.

Spacings:

* ``"uniform"``: uniform in ``t`` (DDPM, score_sde).
* ``"trailing"``: ``t_max (1 - i / steps)``, i.e. uniform in ``t`` but ending at
  ``t_max / steps`` before the final step (the "trailing" spacing of Lin et al. 2024,
  "Common diffusion noise schedules and sample steps are flawed").
* ``"logsnr"``: uniform in log-SNR (DPM-Solver, Lu et al. 2022).
* ``"karras"``: ``sigma_i^(1/rho)`` uniform in the scaled noise level
  ``sigma / alpha`` (Karras et al. 2022, eq. 5; ``rho = 7``).
* ``"edm"``: Karras et al.'s default, ``rho = 7`` between ``sigma_min = 0.002`` and
  ``sigma_max = 80`` (clipped to the process's own range).

A user array is accepted by :func:`check_grid`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from difflax.checks import check_positive_int

__all__ = ["GRIDS", "check_grid", "make_grid"]

# Log-SNR beyond this is treated as the end of the range (the flow interpolant has
# infinite log-SNR at t = 0 and t = 1).
LOG_SNR_CLIP = 30.0


def _log_snr_range(process):
    """``(log_snr(t_max), log_snr(t_min))``, clipped to a finite range."""
    ends = jnp.asarray([process.t_max, process.t_min], jnp.result_type(float))
    lam_lo, lam_hi = jnp.clip(process.log_snr(ends), -LOG_SNR_CLIP, LOG_SNR_CLIP)
    return lam_lo, lam_hi


def _uniform(process, n, **_):
    return jnp.linspace(process.t_max, process.t_min, n)


def _trailing(process, n, **_):
    return process.t_max * (1.0 - jnp.arange(n) / n)


def _logsnr(process, n, **_):
    lam_lo, lam_hi = _log_snr_range(process)
    t = process.t_from_log_snr(jnp.linspace(lam_lo, lam_hi, n))
    # Pin the ends to the exact range (the clip only matters for infinite log-SNR); a grid of
    # one time starts at t_max, as the sampler's x_T does.
    return t.at[-1].set(process.t_min).at[0].set(process.t_max)


def _karras(process, n, rho=7.0, sigma_min=None, sigma_max=None):
    lam_lo, lam_hi = _log_snr_range(process)
    s_max = jnp.exp(-0.5 * lam_lo) if sigma_max is None else jnp.minimum(sigma_max, jnp.exp(-0.5 * lam_lo))
    s_min = jnp.exp(-0.5 * lam_hi) if sigma_min is None else jnp.maximum(sigma_min, jnp.exp(-0.5 * lam_hi))
    frac = jnp.linspace(0.0, 1.0, n)
    sigmas = (s_max ** (1 / rho) + frac * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    t = process.t_from_log_snr(-2.0 * jnp.log(sigmas))
    if sigma_min is None:
        t = t.at[-1].set(process.t_min)
    if sigma_max is None:
        t = t.at[0].set(process.t_max)
    return t


def _edm(process, n, **_):
    return _karras(process, n, rho=7.0, sigma_min=0.002, sigma_max=80.0)


GRIDS = {"uniform": _uniform, "trailing": _trailing, "logsnr": _logsnr, "karras": _karras, "edm": _edm}


def make_grid(name: str, process, steps: int, *, final_zero: bool = True, **kwargs) -> jax.Array:
    """The named grid with ``steps`` intervals: an array of ``steps + 1`` decreasing times.

    Where the process is concrete (not a traced argument) the grid is computed when traced, a
    constant of a jitted sampler: no operations for XLA to compile or fold.
    """
    if name not in GRIDS:
        raise ValueError(f"Unknown grid {name!r}; expected one of {', '.join(map(repr, GRIDS))} or an array of times.")
    check_positive_int(steps, "steps")
    if name == "trailing" and not final_zero:
        raise ValueError("grid 'trailing' ends with the final denoising step; use final_zero=True.")
    if name != "karras" and kwargs:
        raise ValueError(f"grid {name!r} takes no options; got {sorted(kwargs)}.")
    positive = steps if final_zero else steps + 1
    with jax.ensure_compile_time_eval():
        t = GRIDS[name](process, positive, **kwargs)
        if final_zero:
            t = jnp.concatenate([t, jnp.zeros((1,), t.dtype)])
    return t


def check_grid(ts, process=None) -> tuple[jax.Array, bool | None]:
    """Validate a user grid; return it and whether it ends in the final denoising step.

    The second value is ``None`` when ``ts`` is traced (then the caller decides).
    """
    ts = jnp.asarray(ts)
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"grid must be a 1-D array of at least 2 times; got shape {ts.shape}.")
    if isinstance(ts, jax.core.Tracer):
        return ts, None
    arr = np.asarray(ts, dtype=np.float64)
    if not np.all(np.diff(arr) < 0):
        raise ValueError("grid must be strictly decreasing (from noise towards data).")
    final_zero = bool(arr[-1] == 0.0)
    if np.any(arr[:-1] <= 0) if final_zero else np.any(arr <= 0):
        raise ValueError("grid times must be positive, except an exact 0 as the last entry.")
    return ts, final_zero
