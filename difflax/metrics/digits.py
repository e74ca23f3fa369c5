"""A feature network for sklearn's 8x8 digits, trained by difflax itself: FDD and class accuracy.

FID's Inception features mean nothing on 8x8 grey digits, so difflax evaluates its
digits models with a small classifier trained here, deterministically:

* data: the caller passes ``(x_train, y_train, x_test, y_test)`` in ``[-1, 1]``, shape
  ``(N, 8, 8, 1)``; the recipes use the fixed split of :func:`difflax.data.load_digits`
  (every fifth image held out: 1437 train, 360 test), so "held out" means the same images
  for the diffusion model and the classifier (metrics sit below the data layer, so the
  data comes in as arguments);
* network: an MLP ``64 -> 128 -> 64 -> 10`` with ReLUs; the 64-d post-ReLU penultimate
  activations are the *features*;
* training: Adam (lr ``2e-3``), cross-entropy, 40 epochs of fixed-size minibatches of
  128 from a fixed key, the whole run one ``lax.scan`` under ``jit``, so training twice
  on the same backend gives bit-identical parameters.

Metrics built on it:

* Fréchet digits distance (FDD): :func:`~difflax.metrics.frechet.frechet_distance`
  between feature statistics, against the training split by default (the test split is
  what "real held-out digits" score);
* classifier accuracy of class-conditional samples: the fraction classified as the
  label they were generated for.

:func:`load_or_train_digits_classifier` caches the parameters as
``<cache_dir>/digits_classifier_v1.npz`` (a fingerprint of the recipe is stored and checked).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from difflax.metrics import stats as stats_lib
from difflax.metrics.frechet import frechet_distance

__all__ = [
    "DigitsClassifier",
    "DigitsNet",
    "frechet_digits_distance",
    "load_or_train_digits_classifier",
    "train_digits_classifier",
]

CACHE_NAME = "digits_classifier_v1.npz"
RECIPE = {"version": 1, "split": "index % 5 == 0 held out", "init_seed": 0, "lr": 2e-3, "epochs": 40,
          "batch_size": 128, "hidden": 128, "features": 64}  # fmt: skip


def _split(data):
    """Validate the ``(x_train, y_train, x_test, y_test)`` tuple the classifier is trained on."""
    if len(data) != 4:
        raise ValueError("data must be (x_train, y_train, x_test, y_test), e.g. from difflax.data.load_digits.")
    x_train, y_train, x_test, y_test = (np.asarray(a) for a in data)
    return _as_images(x_train), y_train.astype(np.int32), _as_images(x_test), y_test.astype(np.int32)


class DigitsNet(nn.Module):
    """MLP for 8x8x1 digits, ``64 -> 128 -> 64 -> 10`` with ReLUs; returns ``(logits, features)``."""

    hidden: int = 128
    features: int = 64
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden, name="dense1")(x))
        h = nn.relu(nn.Dense(self.features, name="dense2")(x))
        return nn.Dense(self.num_classes, name="head")(h), h


def _recipe_net() -> DigitsNet:
    return DigitsNet(hidden=RECIPE["hidden"], features=RECIPE["features"])


def _as_images(x):
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 2 and x.shape[1] == 64:
        x = x.reshape(-1, 8, 8)
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[1:] != (8, 8, 1):
        raise ValueError(f"digits must have shape (N, 8, 8, 1), (N, 8, 8) or (N, 64); got {x.shape}.")
    return x


@functools.partial(jax.jit, static_argnums=0)
def _apply(net, params, x):
    return net.apply({"params": params}, x)


@dataclass(frozen=True)
class DigitsClassifier:
    """Trained :class:`DigitsNet` parameters with feature, logit and accuracy helpers."""

    params: dict
    test_accuracy: float
    net: DigitsNet

    def logits(self, x) -> jax.Array:
        return _apply(self.net, self.params, _as_images(x))[0]

    def features(self, x) -> jax.Array:
        """``(N, 64)`` penultimate-layer features (the FDD feature space)."""
        return _apply(self.net, self.params, _as_images(x))[1]

    def predict(self, x) -> jax.Array:
        return jnp.argmax(self.logits(x), axis=-1)

    def accuracy(self, x, labels) -> float:
        """Fraction of ``x`` classified as ``labels`` (for class-conditional samples: the label asked for)."""
        return float(jnp.mean(self.predict(x) == jnp.asarray(labels)))

    def stats(self, x) -> stats_lib.FeatureStats:
        """Float64 host :class:`~difflax.metrics.stats.FeatureStats` of the features of ``x``."""
        return stats_lib.to_host(stats_lib.batch_stats(self.features(x)))


def frechet_digits_distance(samples, classifier: DigitsClassifier, reference) -> float:
    """FDD: Fréchet distance between the digits-net features of ``samples`` and ``reference``.

    ``reference`` is a :class:`~difflax.metrics.stats.FeatureStats` or an array of real digits.
    """
    if not isinstance(reference, stats_lib.FeatureStats):
        reference = classifier.stats(reference)
    mu1, s1 = classifier.stats(samples).mu_sigma()
    mu2, s2 = reference.mu_sigma()
    return frechet_distance(mu1, s1, mu2, s2)


def train_digits_classifier(data, seed: int = RECIPE["init_seed"]) -> DigitsClassifier:
    """Train :class:`DigitsNet` with the fixed recipe (deterministic) on ``data`` and measure its test accuracy.

    ``data`` is ``(x_train, y_train, x_test, y_test)``.
    """
    x_train, y_train, x_test, y_test = _split(data)
    net = _recipe_net()
    params = _train(net, jnp.asarray(x_train), jnp.asarray(y_train), seed)
    clf = DigitsClassifier(params=params, test_accuracy=0.0, net=net)
    return DigitsClassifier(params=params, test_accuracy=clf.accuracy(x_test, y_test), net=net)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _train(net, x, y, seed):
    bs, epochs = RECIPE["batch_size"], RECIPE["epochs"]
    steps = x.shape[0] // bs
    init_key, data_key = jax.random.split(jax.random.key(seed))
    params = net.init(init_key, x[:1])["params"]
    tx = optax.adam(RECIPE["lr"])

    def loss_fn(p, xb, yb):
        logits, _ = net.apply({"params": p}, xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    def step(carry, idx):
        p, opt = carry
        grads = jax.grad(loss_fn)(p, x[idx], y[idx])
        updates, opt = tx.update(grads, opt, p)
        return (optax.apply_updates(p, updates), opt), None

    def epoch(carry, k):
        perm = jax.random.permutation(k, x.shape[0])[: steps * bs].reshape(steps, bs)
        return jax.lax.scan(step, carry, perm)[0], None

    (params, _), _ = jax.lax.scan(epoch, (params, tx.init(params)), jax.random.split(data_key, epochs))
    return params


def load_or_train_digits_classifier(data, cache_dir: str | os.PathLike | None = None) -> DigitsClassifier:
    """The digits classifier from ``<cache_dir>/digits_classifier_v1.npz``, training (and caching) it if absent.

    With ``cache_dir=None`` it is trained and not saved. A cache written with another
    recipe is ignored and overwritten.
    """
    path = None if cache_dir is None else os.path.join(os.fspath(cache_dir), CACHE_NAME)
    fingerprint = json.dumps(RECIPE, sort_keys=True)
    if path is not None and os.path.exists(path):
        with np.load(path) as f:
            if "recipe" in f and str(f["recipe"]) == fingerprint:
                params = unflatten_dict({k[len("params/") :]: jnp.asarray(f[k]) for k in f.files
                                         if k.startswith("params/")}, sep="/")  # fmt: skip
                return DigitsClassifier(params=params, test_accuracy=float(f["test_accuracy"]), net=_recipe_net())
    clf = train_digits_classifier(data)
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        flat = {f"params/{k}": np.asarray(v) for k, v in flatten_dict(jax.device_get(clf.params), sep="/").items()}
        tmp = path + ".tmp.npz"
        np.savez(tmp, recipe=np.asarray(fingerprint), test_accuracy=np.asarray(clf.test_accuracy), **flat)
        os.replace(tmp, path)
    return clf
