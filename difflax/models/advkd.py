"""Networks of adversarial knowledge distillation (Adv-KD, Mekonnen et al. 2023).

* :class:`AdvKDStudent`: a chain of submodules evaluated once. Stage 0 takes the noise
  ``z = x_T / std(x_T)`` (for images rearranged losslessly, space-to-depth, to the coarsest
  resolution), every later stage upsamples the features when its resolution is higher and
  refines them, and each stage has a small head (the paper's "terminal module") mapping its
  features to an output at its resolution. The last stage's output is the sample at full
  resolution; the call returns all stage outputs, coarsest (noisiest) first.
* :class:`AdvKDCritics`: one small critic per stage (strided convolutions for images, an MLP
  for flat data), without batch normalization so the WGAN-GP input gradient of each example
  depends on that example only.

Images are NHWC, ``data_shape = (H, W, C)``; flat data has ``data_shape = (D,)``.
Resolutions come as per-stage downsampling factors
(:func:`difflax.distill.advkd.stage_factors`). Submodules follow the paper's
DCGAN-style recipe (two 3x3 convolutions with a normalization and leaky ReLU), with group
normalization instead of batch normalization and a residual connection.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import flax.linen as nn
import jax

from difflax.distill.advkd import stage_factors

Array = jax.Array

__all__ = ["AdvKDCritics", "AdvKDStudent", "advkd_networks"]


def _check_factors(data_shape: tuple, factors: tuple):
    if not factors:
        raise ValueError("factors must name at least one stage.")
    if factors[-1] != 1:
        raise ValueError(f"the last stage outputs at full resolution: factors[-1] must be 1; got {factors}.")
    if len(data_shape) == 1:
        if any(f != 1 for f in factors):
            raise ValueError(f"flat data {data_shape} has no resolution: factors must all be 1; got {factors}.")
        return
    if len(data_shape) != 3:
        raise ValueError(f"data_shape must be (H, W, C) or (D,); got {data_shape}.")
    for a, b in itertools.pairwise(factors):
        if a % b:
            raise ValueError(f"each factor must be a multiple of the next (resolutions only grow); got {factors}.")
    for f in factors:
        if data_shape[0] % f or data_shape[1] % f:
            raise ValueError(f"factor {f} must divide the image size {data_shape[:2]}.")


def _groups(channels: int, wanted: int = 8) -> int:
    g = min(wanted, channels)
    while channels % g:
        g -= 1
    return g


def space_to_depth(x: Array, factor: int) -> Array:
    """``(B, H, W, C) -> (B, H/f, W/f, C f^2)``: a lossless rearrangement to a coarser grid."""
    if factor == 1:
        return x
    b, h, w, c = x.shape
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // factor, w // factor, factor * factor * c)


class _ConvStage(nn.Module):
    """``depth`` times ``h <- h + conv(leaky(norm(conv(leaky(norm(h))))))`` at one resolution."""

    features: int
    depth: int

    @nn.compact
    def __call__(self, h):
        for i in range(self.depth):
            r = nn.leaky_relu(nn.GroupNorm(_groups(self.features), name=f"norm{i}a")(h), 0.2)
            r = nn.Conv(self.features, (3, 3), name=f"conv{i}a")(r)
            r = nn.leaky_relu(nn.GroupNorm(_groups(self.features), name=f"norm{i}b")(r), 0.2)
            h = h + nn.Conv(self.features, (3, 3), name=f"conv{i}b")(r)
        return h


class _DenseStage(nn.Module):
    """``depth`` times ``h <- h + dense(leaky(norm(dense(leaky(norm(h))))))``."""

    features: int
    depth: int

    @nn.compact
    def __call__(self, h):
        for i in range(self.depth):
            r = nn.leaky_relu(nn.LayerNorm(name=f"norm{i}a")(h), 0.2)
            r = nn.Dense(self.features, name=f"dense{i}a")(r)
            r = nn.leaky_relu(nn.LayerNorm(name=f"norm{i}b")(r), 0.2)
            h = h + nn.Dense(self.features, name=f"dense{i}b")(r)
        return h


class AdvKDStudent(nn.Module):
    """The one-pass Adv-KD student: ``student(z) -> (y_stage0, ..., y_final)``.

    Attributes:
      data_shape: shape of one example, ``(H, W, C)`` or ``(D,)``.
      factors: downsampling factor of each stage's output, coarsest first, last ``1``;
        the number of stages is ``len(factors)``.
      features: channels (images) or width (flat data) of every submodule.
      depth: residual blocks per submodule.

    Output ``s`` has shape ``(batch, H / factors[s], W / factors[s], C)`` (images) or
    ``(batch, D)``; ``z`` has the shape of the data, unit-variance Gaussian noise.
    """

    data_shape: Sequence[int]
    factors: Sequence[int]
    features: int = 64
    depth: int = 1

    @nn.compact
    def __call__(self, z: Array) -> tuple[Array, ...]:
        data_shape, factors = tuple(self.data_shape), tuple(int(f) for f in self.factors)
        _check_factors(data_shape, factors)
        if z.shape[1:] != data_shape:
            raise ValueError(f"z must have shape (batch, {', '.join(map(str, data_shape))}); got {z.shape}.")
        outputs = []
        if len(data_shape) == 1:
            h = nn.Dense(self.features, name="stem")(z)
            for s in range(len(factors)):
                h = _DenseStage(self.features, self.depth, name=f"stage{s}")(h)
                head = nn.leaky_relu(nn.LayerNorm(name=f"head{s}_norm")(h), 0.2)
                outputs.append(nn.Dense(data_shape[0], name=f"head{s}")(head))
            return tuple(outputs)
        channels = data_shape[-1]
        h = nn.Conv(self.features, (3, 3), name="stem")(space_to_depth(z, factors[0]))
        for s, f in enumerate(factors):
            if s and factors[s - 1] != f:
                r = factors[s - 1] // f
                b, hh, ww, c = h.shape
                h = jax.image.resize(h, (b, hh * r, ww * r, c), "nearest")
                h = nn.Conv(self.features, (3, 3), name=f"up{s}")(h)
            h = _ConvStage(self.features, self.depth, name=f"stage{s}")(h)
            head = nn.leaky_relu(nn.GroupNorm(_groups(self.features), name=f"head{s}_norm")(h), 0.2)
            outputs.append(nn.Conv(channels, (3, 3), name=f"head{s}")(head))
        return tuple(outputs)


class _ConvCritic(nn.Module):
    features: int
    depth: int

    @nn.compact
    def __call__(self, x):
        h = nn.leaky_relu(nn.Conv(self.features, (3, 3), name="stem")(x), 0.2)
        width = self.features
        for i in range(self.depth):
            stride = 2 if min(h.shape[1:3]) >= 4 else 1
            width = width * stride
            h = nn.leaky_relu(nn.Conv(width, (3, 3), strides=stride, name=f"conv{i}")(h), 0.2)
        return nn.Dense(1, name="out")(h.reshape(h.shape[0], -1))[:, 0]


class _DenseCritic(nn.Module):
    features: int
    depth: int

    @nn.compact
    def __call__(self, x):
        h = x.reshape(x.shape[0], -1)
        for i in range(self.depth + 1):
            h = nn.leaky_relu(nn.Dense(self.features, name=f"dense{i}")(h), 0.2)
        return nn.Dense(1, name="out")(h)[:, 0]


class AdvKDCritics(nn.Module):
    """One Wasserstein critic per stage: ``critics.apply(params, x, stage) -> (batch,)`` scores.

    ``init`` with :meth:`init_all` (all stages' example outputs, e.g. the student's), so every
    stage's critic gets parameters: ``critics.init(key, outputs, method=AdvKDCritics.init_all)``.
    Image critics are ``depth`` leaky-ReLU 3x3 convolutions (stride 2 while the map is at
    least 4x4) and a linear read-out; flat critics are an MLP with ``depth + 1`` hidden layers.
    """

    data_shape: Sequence[int]
    factors: Sequence[int]
    features: int = 32
    depth: int = 2

    def setup(self):
        _check_factors(tuple(self.data_shape), tuple(int(f) for f in self.factors))
        cls = _DenseCritic if len(self.data_shape) == 1 else _ConvCritic
        self.critics = [cls(self.features, self.depth, name=f"critic{s}") for s in range(len(self.factors))]

    def __call__(self, x: Array, stage: int) -> Array:
        if not 0 <= stage < len(self.critics):
            raise ValueError(f"stage must lie in [0, {len(self.critics) - 1}]; got {stage}.")
        return self.critics[stage](x)

    def init_all(self, xs: Sequence[Array]) -> tuple[Array, ...]:
        """Scores of every stage's critic on its own input ``xs[s]``."""
        if len(xs) != len(self.critics):
            raise ValueError(f"got {len(xs)} inputs for {len(self.critics)} critics.")
        return tuple(c(x) for c, x in zip(self.critics, xs, strict=True))


def advkd_networks(
    data_shape: Sequence[int],
    num_outputs: int,
    *,
    features: int | None = None,
    depth: int = 1,
    critic_features: int | None = None,
    critic_depth: int = 2,
    min_size: int = 2,
) -> tuple[AdvKDStudent, AdvKDCritics]:
    """A student with ``num_outputs`` stages and its critics, small defaults for 8x8 digits and 2-D toys.

    Image resolutions follow :func:`~difflax.distill.advkd.stage_factors` down to
    ``min_size``. Defaults: 32 student channels and 16 critic channels for images, width 128
    and 128 for flat data.
    """
    data_shape = tuple(int(d) for d in data_shape)
    image = len(data_shape) == 3
    factors = stage_factors(num_outputs, data_shape[:2] if image else (), min_size)
    features = features or (32 if image else 128)
    critic_features = critic_features or (16 if image else 128)
    student = AdvKDStudent(data_shape, factors, features=features, depth=depth)
    critics = AdvKDCritics(data_shape, factors, features=critic_features, depth=critic_depth)
    return student, critics
