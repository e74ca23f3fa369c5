"""Every value of a training recipe checked in one place, before data or model are built.

:func:`check_config` runs at the start of the job (and of :class:`~difflax.train.loop.Trainer`):
each bad value fails in one line naming the config key, the value and what is allowed, so
a typo costs seconds, not a training run. The sampler and evaluation settings are checked
too (the solver, grid and step count are resolved once on the recipe's process), not found
after training.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from difflax.data.toy2d import TOY_DATASETS
from difflax.losses import WEIGHTINGS
from difflax.models.layers import REMAT_POLICIES
from difflax.parametrization import PREDICTIONS
from difflax.processes import PROCESSES, get_process
from difflax.solvers import SOLVERS, get_solver
from difflax.solvers.grids import GRIDS, make_grid
from difflax.train.builders import COMPUTE_DTYPES, MODELS, T_SAMPLERS
from difflax.train.optim import OPTIMIZERS, SCHEDULES
from difflax.train.sharding import BATCH_AXES, check_rules, mesh_shape

__all__ = ["ConfigError", "check_config"]


class ConfigError(ValueError):
    """A recipe value that is not allowed; the message names the key, the value and what is allowed."""


_MISSING = object()


def _integer(lo: int, hi: float = math.inf) -> tuple[Callable, str]:
    allowed = f"an integer >= {lo}" if hi == math.inf else f"an integer in [{lo}, {hi}]"
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi), allowed


def _real(lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False) -> tuple[Callable, str]:
    def ok(v):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    if hi == math.inf:
        return ok, f"a finite number {'>' if lo_open else '>='} {lo}"
    return ok, f"a number in {left}{lo}, {hi}{right}"


def _choice(options) -> tuple[Callable, str]:
    options = tuple(options)
    return (lambda v: v in options), f"one of {', '.join(map(repr, options))}"


_BOOL = ((lambda v: isinstance(v, bool)), "True or False")


def _dataset_name(v) -> bool:
    return isinstance(v, str) and (
        v == "digits" or v in TOY_DATASETS or (v.startswith(("tfds:", "latents:")) and len(v.split(":", 1)[1]) > 0)
    )


_DATASET = (_dataset_name, f"'digits', 'tfds:<name>', 'latents:<path>' or one of {', '.join(map(repr, TOY_DATASETS))}")
_IMAGE_SIZE = ((lambda v: v is None or _integer(1)[0](v)), "None or an integer >= 1")
_POSITIVE = _real(0.0, lo_open=True)
_NONNEGATIVE = _real(0.0)
_PROBABILITY = _real(0.0, 1.0, hi_open=True)

#: ``(key, (predicate, what is allowed), required)``: the table :func:`check_config` applies.
RULES = (
    ("name", ((lambda v: isinstance(v, str) and v != ""), "a non-empty string"), False),
    ("seed", _integer(0), True),
    ("data.name", _DATASET, True),
    ("data.image_size", _IMAGE_SIZE, False),
    ("process.name", _choice(PROCESSES), True),
    ("model.name", _choice(MODELS), True),
    ("model.prediction", _choice((*PREDICTIONS, "edm")), True),
    ("model.noise_scale", _POSITIVE, False),
    ("model.class_conditional", _BOOL, False),
    ("model.dtype", _choice(COMPUTE_DTYPES), False),
    ("model.remat", _choice(("none", *REMAT_POLICIES)), False),
    ("loss.weighting", _choice(WEIGHTINGS), True),
    ("loss.t_sampler", _choice(T_SAMPLERS), True),
    ("loss.p_mean", _real(-math.inf), False),
    ("loss.p_std", _POSITIVE, False),
    ("loss.p_uncond", _PROBABILITY, False),
    ("optim.optimizer", _choice(OPTIMIZERS), True),
    ("optim.learning_rate", _POSITIVE, True),
    ("optim.schedule", _choice(SCHEDULES), True),
    ("optim.warmup_steps", _integer(0), True),
    ("optim.b1", _PROBABILITY, True),
    ("optim.b2", _PROBABILITY, True),
    ("optim.eps", _POSITIVE, True),
    ("optim.weight_decay", _NONNEGATIVE, False),
    ("optim.grad_clip", _NONNEGATIVE, True),
    ("optim.grad_accum", _integer(1), True),
    ("optim.max_nonfinite", _integer(1), True),
    ("train.steps", _integer(1), True),
    ("train.batch_size", _integer(1), True),
    ("train.ema_decay", _real(0.0, 1.0), True),
    ("train.ema_warmup", _BOOL, False),
    ("train.log_every", _integer(1), True),
    ("train.save_every", _integer(1), True),
    ("train.keep", _integer(1), True),
    ("train.keep_best", _integer(0), True),
    ("train.async_checkpoint", _BOOL, False),
    ("sample.solver", _choice(SOLVERS), True),
    ("sample.steps", _integer(1), True),
    ("sample.grid", _choice(GRIDS), True),
    ("sample.guidance_scale", _NONNEGATIVE, False),
    ("eval.num_samples", _integer(1), True),
    ("eval.every", _integer(0), False),
)


def _lookup(config, key: str):
    node = config
    for part in key.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError):
            return _MISSING
    return node


def _fail(key: str, value, allowed: str, extra: str = "") -> ConfigError:
    return ConfigError(f"config.{key} = {value!r} is not allowed: it must be {allowed}{extra}.")


def _check_sharding(config, device_count: int | None, mesh) -> None:
    """``config.mesh`` fits the devices, ``config.partition_rules`` name known axes, the batch splits."""
    try:
        check_rules(tuple(config.get("partition_rules", None) or ()))
    except ValueError as err:
        raise ConfigError(f"config.partition_rules: {err}") from None
    if mesh is not None:
        sizes = dict(mesh.shape)
    elif device_count is not None:
        shape = config.get("mesh", None)
        try:
            sizes = mesh_shape(None if shape is None else dict(shape), device_count)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    else:
        return
    shards = math.prod(sizes[a] for a in BATCH_AXES)
    if config.train.batch_size % shards:
        raise _fail(
            "train.batch_size",
            config.train.batch_size,
            f"a multiple of the device count {shards} on the batch axes (mesh data x fsdp = "
            f"{sizes['data']} x {sizes['fsdp']}, model = {sizes['model']})",
        )


def check_config(config, *, device_count: int | None = None, mesh=None) -> None:
    """Raise :class:`ConfigError` at the first value of ``config`` that is not allowed.

    Applies :data:`RULES`, then the checks that involve several keys: the device mesh
    (``config.mesh``, resolved over ``device_count`` devices, or the given ``mesh``, see
    :func:`~difflax.train.sharding.mesh_shape`) fits the devices and ``train.batch_size``
    divides over its ``data x fsdp`` batch shards, ``config.partition_rules`` name known mesh
    axes, the process's ``kwargs`` build a process, and the sampler (``sample.solver`` with
    ``sample.grid`` and ``sample.steps``) resolves on the recipe's process.
    """
    for key, (ok, allowed), required in RULES:
        value = _lookup(config, key)
        if value is _MISSING:
            if required:
                raise ConfigError(f"config.{key} is missing: it must be {allowed}.")
            continue
        if not ok(value):
            raise _fail(key, value, allowed)
    _check_sharding(config, device_count, mesh)
    kwargs = dict(config.process.get("kwargs", {}))
    try:
        process = get_process(config.process.name, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"config.process.kwargs = {kwargs!r} is not allowed for process {config.process.name!r}: {err}"
        ) from None
    if not 0 <= process.t_min < process.t_max:
        raise ConfigError(
            f"config.process.kwargs = {kwargs!r} is not allowed: it must give "
            f"0 <= t_min < t_max; got t_min={process.t_min}, t_max={process.t_max}."
        )
    try:
        get_solver(config.sample.solver)
        make_grid(config.sample.grid, process, config.sample.steps)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"config.sample (solver={config.sample.solver!r}, grid={config.sample.grid!r}, "
            f"steps={config.sample.steps!r}) does not resolve on process {config.process.name!r}: {err}"
        ) from None
