"""Objects a recipe names: the network, the process, the denoiser and the noise-level sampler."""

from __future__ import annotations

import jax.numpy as jnp

from difflax import losses
from difflax.models import DiT, MLPResNet, UNet, dit
from difflax.parametrization import as_denoiser
from difflax.processes import get_process

__all__ = [
    "MODELS",
    "T_SAMPLERS",
    "build_model",
    "build_process",
    "init_params",
    "make_apply",
    "make_denoiser",
    "sample_t",
]

MODELS = ("unet", "dit", "mlp")
T_SAMPLERS = ("uniform", "logsnr", "edm", "ddpm")


def build_model(config, num_classes: int | None = None):
    """The network of the ``model`` block: ``name`` in :data:`MODELS` and its ``kwargs``."""
    kwargs = dict(config.kwargs)
    if config.get("class_conditional", False):
        kwargs["num_classes"] = num_classes
    if config.name == "unet":
        return UNet(**kwargs)
    if config.name == "mlp":
        return MLPResNet(**kwargs)
    if config.name == "dit":
        size = kwargs.pop("size", None)
        return dit(size, **kwargs) if size else DiT(**kwargs)
    raise ValueError(f"model.name must be one of {MODELS}; got {config.name!r}.")


def build_process(config):
    return get_process(config.name, **dict(config.get("kwargs", {})))


def make_apply(model, params, y=None, *, noise_scale: float = 1.0, train: bool = False, rng=None, w=None):
    """``apply(x_t, noise) -> raw network output`` with labels ``y`` (and guidance strength ``w``) closed over."""

    def apply(x, noise):
        rngs = {"dropout": rng} if rng is not None else None
        extra = {} if w is None else {"w": w}
        return model.apply({"params": params}, x, noise_scale * noise, y, train=train, rngs=rngs, **extra)

    return apply


def make_denoiser(model, params, process, prediction: str, y=None, *, noise_scale: float = 1.0, w=None):
    """The denoiser of a trained network (inference mode): ``denoise(x_t, t) -> x0_hat``."""
    return as_denoiser(make_apply(model, params, y, noise_scale=noise_scale, w=w), process, prediction)


def sample_t(config, key, shape, process):
    """Training noise levels from the ``loss`` block's ``t_sampler``."""
    name = config.t_sampler
    if name == "uniform":
        return losses.sample_t_uniform(key, shape, process, antithetic=config.get("antithetic", False))
    if name == "logsnr":
        return losses.sample_t_logsnr_uniform(key, shape, process)
    if name == "edm":
        return losses.sample_t_edm(key, shape, process, p_mean=config.p_mean, p_std=config.p_std)
    if name == "ddpm":
        return losses.sample_ddpm_steps(key, shape, process)
    raise ValueError(f"loss.t_sampler must be one of {T_SAMPLERS}; got {name!r}.")


def init_params(model, key, example_shape, conditional: bool):
    """Initial parameters for inputs of ``example_shape`` (with labels if ``conditional``)."""
    x = jnp.zeros((1, *example_shape), jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if conditional else None
    return model.init({"params": key, "dropout": key}, x, jnp.ones((1,)), y)["params"]
