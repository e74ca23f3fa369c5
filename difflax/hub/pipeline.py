"""A diffusers pipeline directory: the model folder, its checked config, and the training process.

A pipeline keeps each model in a folder (``unet/``, ``transformer/``: ``config.json`` and the
weights) and its training noise schedule in ``scheduler/scheduler_config.json``; single-model
repositories keep ``config.json`` and ``scheduler_config.json`` side by side. The schedule
becomes a :class:`~difflax.processes.DiscreteVP` (the DDPM discrete process of Ho et al. 2020,
step ``n`` at ``t = (n + 1) / N``) and the scheduler's ``prediction_type`` the ``prediction``
of :func:`difflax.as_denoiser`. Missing keys take the defaults of the diffusers classes, as
diffusers itself does when it reads the same files.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

from difflax.hub.common import ConversionError, load_config
from difflax.processes import DiscreteVP

__all__ = ["PREDICTIONS", "CheckpointInfo", "checkpoint_info", "model_folder", "read_config", "require"]

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


class CheckpointInfo(NamedTuple):
    """What a converted network needs to become a denoiser: ``as_denoiser(apply, process, prediction)``.

    ``config`` is the model's ``config.json`` with defaults filled in; ``scheduler_config`` the
    scheduler config read (``None`` when there was none: then the DDPM defaults, 1000 linear
    betas from ``1e-4`` to ``0.02`` and epsilon prediction, apply).
    """

    process: DiscreteVP
    prediction: str
    config: dict
    scheduler_config: dict | None


def model_folder(path: str, subfolder: str) -> str:
    """``path`` if it holds ``config.json``, else its ``subfolder`` (``path`` being a pipeline's root)."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        inner = os.path.join(path, subfolder)
        if os.path.isfile(os.path.join(inner, "config.json")):
            return inner
    return path


def read_config(folder: str, class_name: str, defaults: dict[str, Any],
                legacy: dict[str, tuple[str, ...]] | None = None) -> dict:
    """The model config with ``defaults`` filled in; another ``_class_name`` or an unknown key is refused.

    ``legacy`` maps older class names that diffusers reads as ``class_name`` to their config keys
    that it then ignores (and so does this).
    """
    config = load_config(folder)
    found = config.get("_class_name", class_name)
    legacy = legacy or {}
    if found != class_name and found not in legacy:
        raise ConversionError(f"config key '_class_name' of {folder} is {found!r}; "
                              f"this converter reads {', '.join(map(repr, (class_name, *legacy)))}.")
    keys = {k: v for k, v in config.items() if not k.startswith("_") and k not in legacy.get(found, ())}
    unknown = sorted(k for k in keys if k not in defaults)
    if unknown:
        raise ConversionError(f"config key {unknown[0]!r} of {folder} is unknown to the {class_name} layout "
                              f"(unknown keys: {', '.join(unknown)}).")
    return {**defaults, **keys}


def require(config: dict, key: str, allowed: tuple) -> None:
    """Refuse a config value this conversion does not implement, naming the key."""
    if config[key] not in allowed:
        raise ConversionError(f"config key {key!r} is {config[key]!r}; supported: {', '.join(map(repr, allowed))}.")


def _find_scheduler_config(folder: str) -> dict | None:
    for file in (os.path.join(folder, "scheduler_config.json"),
                 os.path.join(os.path.dirname(os.path.abspath(folder)), "scheduler", "scheduler_config.json")):
        if os.path.isfile(file):
            with open(file) as f:
                return json.load(f)
    return None


def _process(config: dict) -> DiscreteVP:
    n = int(config.get("num_train_timesteps", 1000))
    if config.get("rescale_betas_zero_snr", False):
        raise ConversionError("scheduler config key 'rescale_betas_zero_snr' is true: a zero terminal SNR "
                              "(alpha_bar = 0 at the last step) has no DiscreteVP.")
    if config.get("trained_betas") is not None:
        return DiscreteVP.from_betas(config["trained_betas"])
    schedule = config.get("beta_schedule", "linear")
    start, end = config.get("beta_start", 1e-4), config.get("beta_end", 0.02)
    if schedule == "linear":
        return DiscreteVP.linear(n, start, end)
    if schedule == "scaled_linear":
        return DiscreteVP.scaled_linear(n, start, end)
    if schedule == "squaredcos_cap_v2":
        return DiscreteVP.cosine(n)
    raise ConversionError(f"scheduler config key 'beta_schedule' is {schedule!r}; supported: {', '.join(_SCHEDULES)}, "
                          "or trained_betas.")


def checkpoint_info(folder: str, config: dict, scheduler: dict | str | None) -> CheckpointInfo:
    """The :class:`CheckpointInfo` of a model folder: ``scheduler`` is a scheduler config (dict or JSON file),
    or ``None`` to look for ``scheduler_config.json`` beside the model or in the pipeline's ``scheduler/``."""
    if isinstance(scheduler, str):
        with open(scheduler) as f:
            scheduler = json.load(f)
    elif scheduler is None:
        scheduler = _find_scheduler_config(folder)
    else:
        scheduler = dict(scheduler)
    settings = scheduler or {}
    prediction = settings.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise ConversionError(f"scheduler config key 'prediction_type' is {prediction!r}; "
                              f"supported: {', '.join(PREDICTIONS)}.")
    return CheckpointInfo(_process(settings), PREDICTIONS[prediction], config, scheduler)
