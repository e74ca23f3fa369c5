"""Objects a recipe names: the network, the process, the denoiser and the noise-level sampler.

A network becomes a denoiser in one way: :func:`make_apply` is the network call (parameters,
labels, noise scaling) and :func:`difflax.as_denoiser` converts its prediction;
:func:`make_denoiser` composes the two.
"""

from __future__ import annotations

import jax.numpy as jnp

from difflax import losses
from difflax.models import FEATURES, DiT, MLPResNet, UNet, dit
from difflax.parametrization import as_denoiser, network_input
from difflax.processes import get_process

__all__ = [
    "MODELS",
    "T_SAMPLERS",
    "build_model",
    "build_process",
    "init_params",
    "make_apply",
    "make_denoiser",
    "make_features",
    "sample_t",
]

MODELS = ("unet", "dit", "mlp")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
T_SAMPLERS = ("uniform", "logsnr", "edm", "ddpm")


def build_model(config, num_classes: int | None = None):
    """The network of the ``model`` block: ``name`` in :data:`MODELS` and its ``kwargs``.

    ``model.dtype`` (compute dtype, :data:`COMPUTE_DTYPES`; parameters, EMA and optimizer state stay
    float32) and ``model.remat`` (``"none"`` or a policy of :data:`~difflax.models.layers.REMAT_POLICIES`)
    apply to every network unless ``kwargs`` sets them itself.
    """
    kwargs = dict(config.kwargs)
    kwargs.setdefault("dtype", config.get("dtype", "float32"))
    if config.get("remat", "none") != "none":
        kwargs.setdefault("remat", config.remat)
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


def make_apply(
    model, params, y=None, *, noise_scale: float = 1.0, train: bool = False, rng=None, w=None, features: bool = False
):
    """``apply(x_t, noise) -> network output``: the network call that :func:`difflax.as_denoiser` wraps.

    Labels ``y`` (and the guidance strength ``w``) are closed over; the noise input (``t``,
    or ``c_noise`` of an ``"edm"`` network) is multiplied by ``noise_scale``, e.g. ``1000`` to
    give a positional embedding DDPM-like step indices when ``t`` lies in ``[0, 1]``. A
    network that also predicts variances (twice the channels of ``x_t``, e.g.
    ``DiT(learn_sigma=True)``, Nichol & Dhariwal 2021) contributes its first half, the
    prediction of the mean; no loss here trains the variance half. ``features=True`` returns the
    network's sown bottleneck features (:data:`difflax.models.FEATURES`) instead of its output.
    """

    def apply(x, noise):
        rngs = {"dropout": rng} if rng is not None else None
        extra = {} if w is None else {"w": w}
        if features:
            extra["mutable"] = ["intermediates"]
        out = model.apply({"params": params}, x, noise_scale * noise, y, train=train, rngs=rngs, **extra)
        if features:
            sown = out[1].get("intermediates", {}).get(FEATURES)
            if sown is None:
                raise ValueError(f"{type(model).__name__} sows no {FEATURES!r}; the U-Net, DiT and MLP do.")
            return sown[0]
        if out.ndim == x.ndim and out.shape[-1] == 2 * x.shape[-1]:
            out = out[..., : x.shape[-1]]
        return out

    return apply


def make_denoiser(
    model, params, process, prediction: str, y=None, *, noise_scale: float = 1.0, w=None, sigma_data=None
):
    """The denoiser of a network (inference mode): ``as_denoiser(make_apply(...), process, prediction)``.

    ``prediction`` is what the network outputs (``"eps"``, ``"x0"``, ``"v"``, ``"score"``,
    ``"velocity"``, or ``"edm"`` for the preconditioned ``F`` of Karras et al. 2022, with
    ``sigma_data`` defaulting to the process's own); see :func:`difflax.as_denoiser`.
    """
    apply = make_apply(model, params, y, noise_scale=noise_scale, w=w)
    return as_denoiser(apply, process, prediction, sigma_data=sigma_data)


def make_features(
    model, params, process, prediction: str, y=None, *, noise_scale: float = 1.0, w=None, sigma_data=None
):
    """``features(x_t, t)``: the network's bottleneck features at the input its denoiser
    (:func:`make_denoiser`) gives it (:func:`difflax.parametrization.network_input`)."""
    apply = make_apply(model, params, y, noise_scale=noise_scale, w=w, features=True)
    to_input = network_input(process, prediction, sigma_data=sigma_data)
    return lambda x_t, t: apply(*to_input(x_t, t))


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
