"""Noise levels for training: draws of the process time ``t`` for a batch.

* :func:`sample_t_uniform`: ``t ~ U[t_min, t_max]``, optionally antithetic (Kingma et al. 2021);
* :func:`sample_t_logsnr_uniform`: ``lambda = log_snr(t)`` uniform on an interval;
* :func:`sample_t_edm`: EDM's log-normal noise levels (Karras et al. 2022);
* :func:`sample_ddpm_steps`: uniform integer DDPM steps (Ho et al. 2020), as process time.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp

from difflax.checks import as_shape, concrete
from difflax.losses.ddpm import check_discrete
from difflax.processes import DiscreteVP, Process

Array = chex.Array

__all__ = ["sample_ddpm_steps", "sample_t_edm", "sample_t_logsnr_uniform", "sample_t_uniform"]


def _default_float():
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def sample_t_uniform(key: Array, shape, process: Process, antithetic: bool = False, dtype=None) -> Array:
    """``t ~ U[t_min, t_max]`` of shape ``shape``.

    With ``antithetic=True`` the draws are the low-discrepancy set of VDM (Kingma et al.
    2021, appendix): one ``u0 ~ U[0, 1)`` and ``u_i = mod(u0 + i / B, 1)`` for the
    ``B = prod(shape)`` entries (in row-major order), each marginally uniform, jointly
    evenly spaced, which lowers the variance of the batch-mean loss.
    """
    shape = as_shape(shape)
    dtype = dtype or _default_float()
    if antithetic:
        size = math.prod(shape)
        u0 = jax.random.uniform(key, (), dtype)
        u = jnp.mod(u0 + jnp.arange(size, dtype=dtype) / size, 1.0).reshape(shape)
    else:
        u = jax.random.uniform(key, shape, dtype)
    return process.t_min + (process.t_max - process.t_min) * u


def _check_log_snr_bound(value, name: str, default_from: str) -> None:
    v = concrete(value)
    if v is not None and not bool(jnp.all(jnp.isfinite(v))):
        raise ValueError(
            f"{name} must be finite; got {v} ({default_from}). Pass a finite {name} "
            "(for Flow, whose log-SNR is infinite at t = 1, e.g. log_snr_min=-15)."
        )


def sample_t_logsnr_uniform(
    key: Array, shape, process: Process, log_snr_min=None, log_snr_max=None, dtype=None
) -> Array:
    """``t`` whose log-SNR is uniform on ``[log_snr_min, log_snr_max]``, mapped back by ``t_from_log_snr``.

    The bounds default to the process's ends, ``log_snr(t_max)`` and ``log_snr(t_min)``;
    with the defaults ``t`` is clipped to ``[t_min, t_max]`` (only rounding is removed).
    Infinite bounds (Flow at ``t_max = 1``) raise a ``ValueError``: pass finite ones.
    """
    shape = as_shape(shape)
    dtype = dtype or _default_float()
    defaults = log_snr_min is None and log_snr_max is None
    lo = process.log_snr(jnp.asarray(process.t_max, dtype)) if log_snr_min is None else jnp.asarray(log_snr_min, dtype)
    hi = process.log_snr(jnp.asarray(process.t_min, dtype)) if log_snr_max is None else jnp.asarray(log_snr_max, dtype)
    _check_log_snr_bound(lo, "log_snr_min", "default log_snr(t_max)" if log_snr_min is None else "given")
    _check_log_snr_bound(hi, "log_snr_max", "default log_snr(t_min)" if log_snr_max is None else "given")
    lo_c, hi_c = concrete(lo), concrete(hi)
    if lo_c is not None and hi_c is not None and lo_c > hi_c:
        raise ValueError(f"log_snr_min ({lo_c}) must not exceed log_snr_max ({hi_c}).")
    log_snr = lo + (hi - lo) * jax.random.uniform(key, shape, dtype)
    t = process.t_from_log_snr(log_snr)
    if defaults:
        t = jnp.clip(t, process.t_min, process.t_max)
    return t


def sample_t_edm(key: Array, shape, process: Process, p_mean: float = -1.2, p_std: float = 1.2, dtype=None) -> Array:
    """EDM's log-normal noise levels (Karras et al. 2022, sec. 5): ``ln s ~ N(p_mean, p_std^2)``.

    ``s = sigma / alpha`` is the noise level of ``x_t / alpha``, mapped to process time
    by ``t = t_from_log_snr(-2 ln s)`` (for the EDM process ``t = s``). As in EDM, the
    draws are not clipped to ``[t_min, t_max]`` (a DiscreteVP's ``t_from_log_snr`` clamps
    to ``[0, 1]`` itself).
    """
    shape = as_shape(shape)
    dtype = dtype or _default_float()
    log_s = p_mean + p_std * jax.random.normal(key, shape, dtype)
    return process.t_from_log_snr(-2.0 * log_s)


def sample_ddpm_steps(key: Array, shape, process: DiscreteVP, return_steps: bool = False):
    """Uniform integer DDPM steps ``n in {0, .., N-1}``, returned as process time ``t = (n + 1) / N``.

    With ``return_steps=True`` returns ``(t, n)``. ``process`` must be a ``DiscreteVP``.
    """
    check_discrete(process, "sample_ddpm_steps")
    shape = as_shape(shape)
    n = jax.random.randint(key, shape, 0, process.num_steps)
    t = process.time_from_timestep(n)
    return (t, n) if return_steps else t
