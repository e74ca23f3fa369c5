"""The FID Inception-v3 network as a Flax linen module; weights come from a local ``.npz``.

FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) are defined with the 2048-d
``pool3`` features of one specific network: TensorFlow's 2015-12-05 ImageNet
Inception-v3 graph (``inception-2015-12-05.tgz``), used by the TTUR FID code and ported
to PyTorch by pytorch-fid as ``pt_inception-2015-12-05-6726825d.pth``. Numbers are only
comparable with published FIDs when this exact network is used. It differs from
torchvision's Inception-v3 (Szegedy et al. 2016, "Rethinking the Inception architecture")
in its weights, a 1008-way classifier, and three details reproduced here:

* the average-pool branches of the A, C and E blocks do not count padding zeros
  (TensorFlow's ``avg_pool`` with ``SAME`` padding, ``count_include_pad=False``);
* the last block (``Mixed_7c``) uses a 3x3 *max* pool in its pool branch;
* every convolution is ``conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU``.

Nothing is downloaded: convert pytorch-fid's state dict once with
``scripts/convert_inception.py`` (needs torch) and pass the ``.npz`` to
:func:`load_inception`. The ``.npz`` holds flat keys ``"params/<module path>/<name>"`` and
``"batch_stats/<module path>/{mean,var}"`` whose module paths are pytorch-fid's names
(``Mixed_6b/branch7x7_2/conv/kernel`` <- ``Mixed_6b.branch7x7_2.conv.weight``), with
kernels in Flax's ``HWIO`` layout (:func:`convert_torch_state_dict`).

Inputs are NHWC images in ``[-1, 1]`` (difflax's data range). Like pytorch-fid, images
are bilinearly resized to 299x299 without antialiasing (``F.interpolate(...,
align_corners=False)``); pytorch-fid's ``2 x - 1`` input scaling is the identity here
because inputs already lie in ``[-1, 1]``. On GPU, XLA's default matmul/conv precision
may use TF32; pass ``precision="highest"`` to reproduce float32 features closely.

Parameter count (``params`` collection, BatchNorm scales/offsets included, running
statistics excluded): 21,785,568 without the classifier, 23,850,960 with the 2048 x 1008
``fc`` layer (``logits=True``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

__all__ = [
    "FID_FEATURE_DIM",
    "InceptionV3FID",
    "convert_torch_state_dict",
    "inception_feature_fn",
    "load_inception",
    "resize_bilinear",
    "save_inception",
]

FID_FEATURE_DIM = 2048
INPUT_SIZE = 299


def resize_bilinear(images, size: int = INPUT_SIZE):
    """NHWC images to ``size x size``, bilinear without antialiasing: ``F.interpolate(..., align_corners=False)``."""
    if images.shape[1:3] == (size, size):
        return images
    return jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "bilinear", antialias=False)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class ConvBN(nn.Module):
    """``relu(BatchNorm(conv(x)))``, torchvision's ``BasicConv2d`` (conv without bias, BN eps 1e-3)."""

    features: int
    kernel_size: Any = 1
    strides: Any = 1
    padding: Any = 0
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        ph, pw = _pair(self.padding)
        x = nn.Conv(
            self.features,
            _pair(self.kernel_size),
            strides=_pair(self.strides),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=self.precision,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_same(x):
    """3x3 stride-1 average pool that ignores padding (TensorFlow SAME semantics)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nn.Module):
    pool_features: int
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        c = lambda *a, **k: ConvBN(*a, precision=self.precision, **k)
        b1 = c(64, 1, name="branch1x1")(x)
        b5 = c(48, 1, name="branch5x5_1")(x)
        b5 = c(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = c(64, 1, name="branch3x3dbl_1")(x)
        b3 = c(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = c(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = c(self.pool_features, 1, name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        c = lambda *a, **k: ConvBN(*a, precision=self.precision, **k)
        b3 = c(384, 3, strides=2, name="branch3x3")(x)
        bd = c(64, 1, name="branch3x3dbl_1")(x)
        bd = c(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = c(96, 3, strides=2, name="branch3x3dbl_3")(bd)
        bp = nn.max_pool(x, (3, 3), strides=(2, 2))
        return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        c = lambda *a, **k: ConvBN(*a, precision=self.precision, **k)
        c7 = self.channels_7x7
        b1 = c(192, 1, name="branch1x1")(x)
        b7 = c(c7, 1, name="branch7x7_1")(x)
        b7 = c(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = c(c7, 1, name="branch7x7dbl_1")(x)
        bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = c(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = c(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = c(192, 1, name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        c = lambda *a, **k: ConvBN(*a, precision=self.precision, **k)
        b3 = c(192, 1, name="branch3x3_1")(x)
        b3 = c(320, 3, strides=2, name="branch3x3_2")(b3)
        b7 = c(192, 1, name="branch7x7x3_1")(x)
        b7 = c(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = c(192, 3, strides=2, name="branch7x7x3_4")(b7)
        bp = nn.max_pool(x, (3, 3), strides=(2, 2))
        return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
    """The E block; ``max_pool=True`` is the FID network's ``Mixed_7c`` quirk."""

    max_pool: bool = False
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        c = lambda *a, **k: ConvBN(*a, precision=self.precision, **k)
        b1 = c(320, 1, name="branch1x1")(x)
        b3 = c(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                c(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                c(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = c(448, 1, name="branch3x3dbl_1")(x)
        bd = c(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                c(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                c(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_same(x)
        bp = c(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3FID(nn.Module):
    """FID Inception-v3: NHWC images in ``[-1, 1]`` -> ``(N, 2048)`` pool3 features.

    Attributes:
      resize: bilinearly resize inputs to 299x299 (no antialiasing, as pytorch-fid).
      logits: also return the 1008-way classifier logits, ``(features, logits)``.
      precision: ``jax.lax.Precision`` (or name) for the convolutions.
    """

    resize: bool = True
    logits: bool = False
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"InceptionV3FID expects NHWC RGB images of shape (N, H, W, 3); got {x.shape}.")
        x = x.astype(jnp.float32)
        if self.resize:
            x = resize_bilinear(x)
        p = self.precision
        x = ConvBN(32, 3, strides=2, precision=p, name="Conv2d_1a_3x3")(x)
        x = ConvBN(32, 3, precision=p, name="Conv2d_2a_3x3")(x)
        x = ConvBN(64, 3, padding=1, precision=p, name="Conv2d_2b_3x3")(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
        x = ConvBN(80, 1, precision=p, name="Conv2d_3b_1x1")(x)
        x = ConvBN(192, 3, precision=p, name="Conv2d_4a_3x3")(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
        x = InceptionA(32, precision=p, name="Mixed_5b")(x)
        x = InceptionA(64, precision=p, name="Mixed_5c")(x)
        x = InceptionA(64, precision=p, name="Mixed_5d")(x)
        x = InceptionB(precision=p, name="Mixed_6a")(x)
        x = InceptionC(128, precision=p, name="Mixed_6b")(x)
        x = InceptionC(160, precision=p, name="Mixed_6c")(x)
        x = InceptionC(160, precision=p, name="Mixed_6d")(x)
        x = InceptionC(192, precision=p, name="Mixed_6e")(x)
        x = InceptionD(precision=p, name="Mixed_7a")(x)
        x = InceptionE(max_pool=False, precision=p, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, precision=p, name="Mixed_7c")(x)
        features = jnp.mean(x, axis=(1, 2))
        if not self.logits:
            return features
        return features, nn.Dense(1008, precision=p, name="fc")(features)


# ---------------------------------------------------------------------------- weights I/O
_BN_RENAME = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}  # fmt: skip


def convert_torch_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """pytorch-fid's FID Inception state dict (name -> array) -> this module's flat ``.npz`` layout.

    Pure numpy (values may be torch tensors; they go through ``np.asarray``):

    * ``<path>.conv.weight`` ``(O, I, kh, kw)`` -> ``params/<path>/conv/kernel`` ``(kh, kw, I, O)``
    * ``<path>.bn.{weight, bias}`` -> ``params/<path>/bn/{scale, bias}``
    * ``<path>.bn.{running_mean, running_var}`` -> ``batch_stats/<path>/bn/{mean, var}``
    * ``fc.weight`` ``(1008, 2048)`` -> ``params/fc/kernel`` ``(2048, 1008)``; ``fc.bias`` -> ``params/fc/bias``
    * ``num_batches_tracked`` and ``AuxLogits.*`` (not part of the FID network) are dropped.

    The key set is checked against the module by :func:`load_inception`.
    """
    out = {}
    for name, value in state_dict.items():
        parts = name.split(".")
        if parts[-1] == "num_batches_tracked" or parts[0] == "AuxLogits":
            continue
        arr = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, dtype=np.float32)
        path = "/".join(parts[:-2])
        if parts[-2:] == ["conv", "weight"] and arr.ndim == 4:
            out[f"params/{path}/conv/kernel"] = np.ascontiguousarray(arr.transpose(2, 3, 1, 0))
        elif parts[-2] == "bn" and parts[-1] in _BN_RENAME:
            col, leaf = _BN_RENAME[parts[-1]]
            out[f"{col}/{path}/bn/{leaf}"] = arr
        elif name == "fc.weight":
            out["params/fc/kernel"] = np.ascontiguousarray(arr.T)
        elif name == "fc.bias":
            out["params/fc/bias"] = arr
        else:
            raise ValueError(f"unexpected entry {name!r} with shape {arr.shape} in the Inception state dict.")
    return out


def _expected_shapes(logits: bool) -> dict[str, tuple]:
    """``{flat name: shape}`` of every variable of :class:`InceptionV3FID` (traced once, then cached)."""
    return dict(_expected_shapes_cached(bool(logits)))


@functools.lru_cache(maxsize=2)
def _expected_shapes_cached(logits: bool) -> tuple:
    shapes = jax.eval_shape(
        InceptionV3FID(logits=logits).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32)
    )
    return tuple((k, tuple(v.shape)) for k, v in flatten_dict(shapes, sep="/").items())


def save_inception(path, variables) -> None:
    """Write Flax ``variables`` (``{"params": ..., "batch_stats": ...}``) in the flat ``.npz`` layout."""
    flat = flatten_dict(jax.device_get(dict(variables)), sep="/")
    np.savez(path, **{k: np.asarray(v, np.float32) for k, v in flat.items()})


def load_inception(path, logits: bool = False) -> dict:
    """Load Flax variables for :class:`InceptionV3FID` from a local ``.npz`` (nothing is downloaded).

    Checks that every expected array is present with the right shape; ``fc`` is only
    required (and kept) when ``logits=True``.
    """
    with np.load(path) as f:
        flat = {k: np.asarray(f[k]) for k in f.files}
    if not logits:
        flat = {k: v for k, v in flat.items() if not k.startswith("params/fc/")}
    expected = _expected_shapes(logits)
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the FID Inception layout: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} ({len(missing)}), unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})."
        )
    bad = [(k, flat[k].shape, s) for k, s in expected.items() if flat[k].shape != tuple(s)]
    if bad:
        raise ValueError(f"{path}: wrong shapes (name, found, expected): {bad[:5]}.")
    return unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")


def inception_feature_fn(variables, precision=None) -> Callable[[jax.Array], jax.Array]:
    """A jitted ``features(images) -> (N, 2048)`` for images NHWC in ``[-1, 1]``.

    One-channel images are repeated to RGB; any size is resized to 299x299.
    """
    model = InceptionV3FID(precision=precision)

    @jax.jit
    def features(images):
        if images.ndim == 3:
            images = images[..., None]
        if images.shape[-1] == 1:
            images = jnp.repeat(images, 3, axis=-1)
        return model.apply(variables, images)

    return features
