"""Sample-quality evaluation: generate N samples per seed, sharded, and score their features.

For each seed, :func:`generate_stats` draws ``num_samples`` samples (50,000 by default,
the standard for FID on image datasets) in batches of ``batch_size``:

* batch ``b`` of seed ``s`` uses the key ``fold_in(key(s), b)`` to draw the starting
  noise ``x_T`` (and the stochastic solver's noise), so the samples do not depend on the
  number of devices (JAX's partitionable threefry generates the same bits whatever the
  sharding), only on ``(seed, batch_size, b)``;
* the batch is sharded along the ``"data"`` axis of a ``jax.sharding.Mesh`` (all local
  devices by default), sampled with :func:`difflax.sample`, and mapped to features with
  ``feature_fn`` (Inception, the digits net, or the identity for toy data), all in one
  ``jit``;
* each device reduces its shard to :class:`~difflax.metrics.stats.FeatureStats`, merged
  across the mesh with :func:`~difflax.metrics.stats.psum_stats` inside ``shard_map``; the
  per-batch result is fetched to the host and merged across batches in float64;
* the last batch is masked so exactly ``num_samples`` rows are counted.

:func:`evaluate` repeats this for several seeds (EDM's protocol: three seeds, 50k
samples each), scores every seed against reference statistics (Fréchet distance),
optionally against reference features (KID, precision/recall/density/coverage) or with
a class-accuracy classifier and any ``feature_metrics``, and reports per metric the
mean, sample standard deviation, minimum (the number EDM's tables quote) and the
per-seed values. With ``save_dir`` each seed's statistics are saved as
``stats_seed<s>.npz`` (:func:`~difflax.metrics.stats.save_stats` layout: ``mu``,
``sigma``, ``count``) next to ``results.json``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from difflax.metrics import stats as stats_lib
from difflax.metrics.frechet import frechet_distance
from difflax.metrics.kid import kid as kid_fn
from difflax.metrics.prdc import prdc as prdc_fn
from difflax.solvers import sample

__all__ = ["EvalResult", "evaluate", "generate_stats", "make_data_mesh"]


def make_data_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all devices)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), ("data",))


@dataclass
class EvalResult:
    """Per-metric summaries over seeds and the per-seed feature statistics.

    ``metrics[name]`` is ``{"mean", "std", "min", "max", "per_seed"}`` (``std`` with
    ``ddof=1``, 0 for a single seed).
    """

    metrics: dict[str, dict]
    stats: list[stats_lib.FeatureStats]
    seeds: list[int]
    config: dict = field(default_factory=dict)

    def summary(self) -> str:
        parts = [
            f"{k}: {v['mean']:.6g} ± {v['std']:.3g} (min {v['min']:.6g}, {len(v['per_seed'])} seeds)"
            for k, v in self.metrics.items()
        ]
        return "; ".join(parts)


def _summarize(values: Sequence[float]) -> dict:
    a = np.asarray(values, np.float64)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
        "per_seed": [float(v) for v in a],
    }


def _batch_program(denoise, process, shape, batch_size, feature_fn, mesh, solver, steps, grid, num_classes,
                   classifier_fn, solver_args):  # fmt: skip
    """One jitted program: key, batch index, #valid -> (FeatureStats, features, #correct)."""
    data = NamedSharding(mesh, P("data"))
    stats_fn = jax.shard_map(
        lambda f, m: stats_lib.psum_stats(stats_lib.batch_stats(f, m), "data"),
        mesh=mesh,
        in_specs=(P("data"), P("data")),
        out_specs=P(),
    )

    def program(key, batch_index, n_valid):
        noise_key, solver_key = jax.random.split(key)
        x_T = process.prior_sample(noise_key, (batch_size, *shape))
        x_T = jax.lax.with_sharding_constraint(x_T, data)
        rows = jnp.arange(batch_size)
        labels = None
        den = denoise
        if num_classes:
            labels = jax.lax.with_sharding_constraint((batch_index * batch_size + rows) % num_classes, data)
            den = lambda x, t: denoise(x, t, labels)
        x0, _ = sample(den, process, x_T, solver=solver, steps=steps, grid=grid, key=solver_key, **solver_args)
        feats = feature_fn(x0)
        feats = jax.lax.with_sharding_constraint(feats.reshape(batch_size, -1), data)
        mask = rows < n_valid
        stats = stats_fn(feats, mask)
        correct = jnp.zeros((), jnp.int32)
        if classifier_fn is not None:
            pred = jnp.argmax(classifier_fn(x0), axis=-1)
            correct = jnp.sum((pred == labels) & mask)
        return stats, feats, correct

    return jax.jit(program)


def generate_stats(
    denoise: Callable,
    process,
    shape: Sequence[int],
    *,
    feature_fn: Callable,
    seed: int = 0,
    num_samples: int = 50_000,
    batch_size: int = 500,
    solver="heun",
    steps: int = 18,
    grid=None,
    mesh: Mesh | None = None,
    keep_features: bool = False,
    num_classes: int | None = None,
    classifier_fn: Callable | None = None,
    _program=None,
    **solver_args,
):
    """Generate ``num_samples`` samples for one seed and accumulate their feature statistics.

    Args:
      denoise: ``denoise(x_t, t) -> x0_hat``, or ``denoise(x_t, t, y)`` when ``num_classes`` is set.
      process: the forward process (gives the prior and the time grid).
      shape: shape of one sample, e.g. ``(32, 32, 3)``.
      feature_fn: jax-traceable ``samples (B, *shape) -> features (B, F)``.
      seed: the seed; batch ``b`` uses ``jax.random.fold_in(jax.random.key(seed), b)``.
      num_samples: number of samples counted (the last batch is masked).
      batch_size: global batch size, a multiple of the number of devices in ``mesh``.
      solver, steps, grid, **solver_args: passed to :func:`difflax.sample`.
      mesh: mesh with a ``"data"`` axis (default: all devices).
      keep_features: also return all ``(num_samples, F)`` features as a numpy array.
      num_classes: class-conditional generation with balanced labels ``i % num_classes``
        (``i`` the sample index).
      classifier_fn: ``samples -> logits``; adds the fraction of samples classified as
        their label (needs ``num_classes``).

    Returns:
      ``(stats, features or None, accuracy or None)``, ``stats`` float64 on the host.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive; got {num_samples}.")
    if classifier_fn is not None and not num_classes:
        raise ValueError("classifier_fn scores class-conditional samples: pass num_classes too.")
    mesh = make_data_mesh() if mesh is None else mesh
    if "data" not in mesh.axis_names:
        raise ValueError(f"mesh must have a 'data' axis; got axes {mesh.axis_names}.")
    n_dev = mesh.shape["data"]
    if batch_size % n_dev:
        raise ValueError(f"batch_size ({batch_size}) must be a multiple of the {n_dev} devices on the 'data' axis.")
    program = _program or _batch_program(
        denoise, process, tuple(shape), batch_size, feature_fn, mesh, solver, steps, grid, num_classes,
        classifier_fn, solver_args,
    )  # fmt: skip
    seed_key = jax.random.key(seed)
    num_batches = math.ceil(num_samples / batch_size)
    total = None
    kept = []
    correct = 0

    def collect(out, n_valid):
        nonlocal total, correct
        stats, feats, corr = out
        host = stats_lib.to_host(stats)
        total = host if total is None else stats_lib.merge(total, host)
        correct += int(corr)
        if keep_features:
            kept.append(np.asarray(jax.device_get(feats))[:n_valid])

    pending = None
    for b in range(num_batches):
        n_valid = min(batch_size, num_samples - b * batch_size)
        out = program(jax.random.fold_in(seed_key, b), jnp.int32(b), jnp.int32(n_valid))
        if pending is not None:  # fetch the previous batch while this one runs
            collect(*pending)
        pending = (out, n_valid)
    collect(*pending)
    features = np.concatenate(kept) if keep_features else None
    accuracy = correct / num_samples if classifier_fn is not None else None
    return total, features, accuracy


def evaluate(
    denoise: Callable,
    process,
    shape: Sequence[int],
    *,
    feature_fn: Callable,
    reference_stats: stats_lib.FeatureStats | None = None,
    reference_features=None,
    seeds: Sequence[int] = (0, 1, 2),
    num_samples: int = 50_000,
    batch_size: int = 500,
    solver="heun",
    steps: int = 18,
    grid=None,
    mesh: Mesh | None = None,
    num_classes: int | None = None,
    classifier_fn: Callable | None = None,
    kid: bool | Mapping = False,
    prdc: bool | Mapping = False,
    feature_metrics: Mapping[str, Callable[[np.ndarray], float]] | None = None,
    save_dir: str | os.PathLike | None = None,
    **solver_args,
) -> EvalResult:
    """Score a sampler over several seeds; see the module docstring for the protocol.

    Args:
      denoise, process, shape, feature_fn, num_samples, batch_size, solver, steps, grid,
        mesh, num_classes, classifier_fn, **solver_args: as in :func:`generate_stats`.
      reference_stats: statistics of the real data (e.g. :func:`~difflax.metrics.stats.load_stats`
        of a reference ``.npz``): adds ``"fd"``, the Fréchet distance (FID with Inception features).
      reference_features: ``(N, F)`` real features, needed by ``kid`` and ``prdc``.
      seeds: one full evaluation per seed.
      kid: add ``"kid"`` (``True`` or keyword arguments of :func:`~difflax.metrics.kid.kid`).
      prdc: add ``"precision"``, ``"recall"``, ``"density"``, ``"coverage"`` (``True`` or
        keyword arguments of :func:`~difflax.metrics.prdc.prdc`).
      feature_metrics: ``name -> fn(features) -> float`` on each seed's ``(num_samples, F)``
        features, e.g. an exact NLL or a sliced Wasserstein distance for toy data with
        identity features.
      save_dir: where to write ``stats_seed<s>.npz`` and ``results.json``.

    Returns:
      :class:`EvalResult`.
    """
    if (kid or prdc) and reference_features is None:
        raise ValueError("kid and prdc compare against real features: pass reference_features.")
    if not seeds:
        raise ValueError("seeds must name at least one seed.")
    mesh = make_data_mesh() if mesh is None else mesh
    keep = bool(kid or prdc or feature_metrics)
    program = _batch_program(
        denoise, process, tuple(shape), batch_size, feature_fn, mesh, solver, steps, grid, num_classes,
        classifier_fn, solver_args,
    )  # fmt: skip
    ref_mu_sigma = reference_stats.mu_sigma() if reference_stats is not None else None
    per_seed: dict[str, list[float]] = {}
    all_stats = []
    for seed in seeds:
        stats, feats, acc = generate_stats(
            denoise, process, shape, feature_fn=feature_fn, seed=seed, num_samples=num_samples,
            batch_size=batch_size, mesh=mesh, keep_features=keep, num_classes=num_classes,
            classifier_fn=classifier_fn, _program=program,
        )  # fmt: skip
        all_stats.append(stats)
        values = {}
        if ref_mu_sigma is not None:
            values["fd"] = frechet_distance(*stats.mu_sigma(), *ref_mu_sigma)
        if acc is not None:
            values["accuracy"] = acc
        if kid:
            kw = dict(kid) if isinstance(kid, Mapping) else {}
            kw.setdefault("subset_size", min(1000, num_samples, len(reference_features)))
            values["kid"], values["kid_subset_std"] = kid_fn(reference_features, feats, **kw)
        if prdc:
            values.update(prdc_fn(reference_features, feats, **(dict(prdc) if isinstance(prdc, Mapping) else {})))
        for name, fn in (feature_metrics or {}).items():
            values[name] = float(fn(feats))
        for k, v in values.items():
            per_seed.setdefault(k, []).append(float(v))
        if save_dir is not None:
            os.makedirs(save_dir, exist_ok=True)
            stats_lib.save_stats(os.path.join(save_dir, f"stats_seed{seed}.npz"), stats)
    config = {"num_samples": num_samples, "batch_size": batch_size, "solver": str(solver), "steps": steps,
              "grid": grid if isinstance(grid, str | None) else "array", "devices": int(mesh.size),
              "num_classes": num_classes}  # fmt: skip
    result = EvalResult(
        metrics={k: _summarize(v) for k, v in per_seed.items()}, stats=all_stats, seeds=list(seeds), config=config
    )
    if save_dir is not None:
        with open(os.path.join(save_dir, "results.json"), "w") as f:
            json.dump({"metrics": result.metrics, "seeds": result.seeds, "config": config}, f, indent=2)
    return result
