"""Reading a PyTorch-world checkpoint directory without torch: its ``config.json`` and tensors.

A diffusers-format model directory holds ``config.json`` and ``diffusion_pytorch_model.safetensors``
(or a torch ``.bin``). Tensors are read with the ``safetensors`` NumPy API; a torch file is
read only when torch is installed, and only with ``weights_only=True`` (no pickled code runs).
Every failure names the file, tensor or key: :class:`ConversionError`.
"""

from __future__ import annotations

import json
import os

import numpy as np

__all__ = ["ConversionError", "TensorSource", "load_config", "load_tensors"]

_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                 "pytorch_model.bin")


class ConversionError(ValueError):
    """A checkpoint that does not match the layout being converted (the message names the tensor or key)."""


def load_config(path: str) -> dict:
    """The ``config.json`` of a model directory (or the JSON file itself) as a dict."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ConversionError(f"no config.json in {path}: expected a diffusers-format model directory.")
    with open(file) as f:
        return json.load(f)


def _weights_file(path: str) -> str:
    if os.path.isfile(path):
        return path
    for name in _WEIGHT_FILES:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            return file
    raise ConversionError(f"no weights in {path}: expected one of {', '.join(_WEIGHT_FILES)}.")


def load_tensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a weights file (or of the model directory ``path``) as float32 NumPy arrays, by name."""
    file = _weights_file(path)
    if file.endswith(".safetensors"):
        from safetensors.numpy import load_file

        tensors = load_file(file)
    else:
        try:
            import torch
        except ImportError:
            raise ConversionError(f"{file} is a torch file: install torch to read it, or convert it to "
                                  ".safetensors.") from None
        state = torch.load(file, map_location="cpu", weights_only=True)
        tensors = {k: v.detach().float().numpy() for k, v in state.items()}
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


class TensorSource:
    """Tensors by name, handed out once each, so a conversion proves it used every one.

    ``take(name, shape)`` returns the tensor (checking its shape); :meth:`finish` raises
    :class:`ConversionError` listing the tensors never taken (a checkpoint of another layout,
    or a config that does not describe it).
    """

    def __init__(self, tensors: dict[str, np.ndarray], origin: str = "the checkpoint"):
        self._tensors = dict(tensors)
        self._taken: set[str] = set()
        self.origin = origin

    def take(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if name not in self._tensors:
            raise ConversionError(f"tensor {name!r} is missing from {self.origin}.")
        value = self._tensors[name]
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise ConversionError(f"tensor {name!r} of {self.origin} has shape {tuple(value.shape)}; "
                                  f"the model expects {tuple(shape)}.")
        self._taken.add(name)
        return value

    def has(self, name: str) -> bool:
        return name in self._tensors

    def finish(self) -> None:
        left = sorted(set(self._tensors) - self._taken)
        if left:
            more = f" and {len(left) - 5} more" if len(left) > 5 else ""
            raise ConversionError(f"{len(left)} tensor(s) of {self.origin} were not used: "
                                  f"{', '.join(left[:5])}{more}; it is not of the layout being converted.")
