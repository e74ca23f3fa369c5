"""Benchmark: speculative sampling (De Bortoli et al. 2025) against the plain ancestral sampler.

Both samplers run the same Markov chain (DDPM / DDIM ``eta = 1`` on the uniform grid of
``--steps`` steps, VP process) from the same starting noise; speculative sampling returns
exact samples of it (``tests/test_speculative.py`` proves it on Gaussian mixtures). For
every draft and every ``K`` in ``--ks`` the table reports

* ``calls``: sequential (batched) target calls; the plain sampler makes ``steps``;
* ``target NFE``: example-states the target evaluated (``calls x batch x (K + 1)``: finished
  examples and proposals past the end of the grid are evaluated too, as fixed shapes require);
* ``draft NFE``: example-states the draft evaluated (0 for the frozen draft);
* ``accept``: the fraction of verified proposals accepted; ``acc len``: accepted proposals per
  example and round; ``advance``: grid steps per example and round (at most ``K + 1``);
* ``ms``: wall time of the jitted sampler (median of ``--repeats`` runs after a warm-up
  compile, ``block_until_ready``), and the ratios of calls and time to the plain sampler.

Problems:

1. ``toy2d``: the 5x5 Gaussian grid of :func:`difflax.data.toy2d.toy_mixture` with its exact
   denoiser as the target. Drafts: ``frozen`` (the target's last verified ``x0`` held fixed,
   no draft network) and ``perturbed`` (the exact denoiser of the grid with every mean moved by
   ``--perturb`` in a random direction and the widths scaled by 1.1: a stand-in for a good
   distilled student). The class histogram of the samples is checked against the plain
   sampler's (chi-square p-value).
2. ``digits``: sklearn's 8x8 digits (flattened to 64 values in ``[-1, 1]``); the target is an
   eps-prediction :class:`~difflax.models.MLPResNet` (``--target-features``, ``--target-blocks``)
   trained here for ``--train-steps`` steps. Drafts (``--draft``, comma-separated):
   ``frozen``; ``small``: a small MLPResNet (``--draft-features``, ``--draft-blocks``)
   trained the same way on the same data (a cheap network, not a distilled one); ``distilled``:
   the same small network distilled from the target (its eps prediction regresses the
   target's at the same noisy input, the error that decides acceptance); ``target``:
   the target itself (every proposal is accepted: the ideal draft); or ``MODULE:FUNCTION``, a
   factory ``FUNCTION(process, target, images) -> denoiser`` that builds any other draft, e.g.
   a student distilled from ``target`` with :mod:`difflax.distill`. As a sanity check the
   per-pixel means and standard deviations of the samples are compared with the plain sampler's.

On a CPU every example-state costs the same, so wall time follows the target NFE more than
the number of calls; the saving in sequential calls turns into wall time where a batched
call of ``(K + 1) x batch`` states costs about as much as one of ``batch`` (accelerators at
small batch, or large networks at batch 1).

    python -m benchmarks.speculative [--problems toy2d,digits] [--steps 100] [--ks 1,2,4,8] [--draft NAMES]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One thread per XLA:CPU op: timings on a shared machine are then reproducible. Set XLA_FLAGS to override.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats

import difflax
from difflax import losses
from difflax.analytic import GaussianMixture
from difflax.data.digits import load_digits
from difflax.data.toy2d import toy_mixture
from difflax.models import MLPResNet
from difflax.solvers import speculative_sample


def median_time(fn, repeats):
    """Median wall time of ``fn()`` (which blocks until its result is ready) after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def run_problem(name, process, target, drafts, x_T, args, check, log):
    """Plain ancestral sampler and speculative sampling for every draft and ``K``; prints the table."""
    key = jax.random.key(args.seed + 1)
    plain = jax.jit(lambda x, k: difflax.sample(target, process, x, solver="ddpm", steps=args.steps, key=k))
    ref, info = plain(x_T, key)
    t_plain = median_time(lambda: jax.block_until_ready(plain(x_T, key)), args.repeats)
    batch = x_T.shape[0]
    rows = [
        {
            "draft": "plain",
            "K": 0,
            "calls": int(info["nfe"]),
            "target_nfe": int(info["nfe"]) * batch,
            "draft_nfe": 0,
            "ms": 1e3 * t_plain,
        }
    ]
    for draft_name, draft in drafts.items():
        for K in args.ks:
            run = jax.jit(
                lambda x, k, draft=draft, K=K: speculative_sample(target, draft, process, x, k, steps=args.steps, K=K)
            )
            x, info = run(x_T, key)
            t = median_time(lambda run=run: jax.block_until_ready(run(x_T, key)), args.repeats)
            rows.append(
                {
                    "draft": draft_name,
                    "K": K,
                    "calls": int(info["target_calls"]),
                    "target_nfe": int(info["target_nfe"]),
                    "draft_nfe": int(info["draft_nfe"]),
                    "accept": float(info["acceptance_rate"]),
                    "accepted_length": float(info["accepted_length"]),
                    "advance": float(info["mean_advance"]),
                    "ms": 1e3 * t,
                    "check": check(np.asarray(x), np.asarray(ref)),
                }
            )
    log(f"\n{name}: batch {batch}, {args.steps} steps (uniform grid, final denoising step included)")
    head = (
        f"{'draft':>10s} {'K':>2s} {'calls':>6s} {'target NFE':>11s} {'draft NFE':>10s} {'accept':>7s} "
        f"{'acc len':>7s} {'advance':>7s} {'ms':>9s} {'calls/plain':>11s} {'time/plain':>10s}  check"
    )
    log(head)
    log("-" * len(head))
    for r in rows:
        log(
            f"{r['draft']:>10s} {r['K'] or '-':>2} {r['calls']:6d} {r['target_nfe']:11d} {r['draft_nfe']:10d} "
            f"{r.get('accept', float('nan')):7.3f} {r.get('accepted_length', float('nan')):7.2f} "
            f"{r.get('advance', float('nan')):7.2f} {r['ms']:9.1f} {r['calls'] / rows[0]['calls']:11.2f} "
            f"{r['ms'] / rows[0]['ms']:10.2f}  {r.get('check', '')}"
        )
    return rows


# ----------------------------------------------------------------------------------------------
# 1. toy2d


def toy2d(args, log):
    process = difflax.VP()
    gm = toy_mixture("grid")
    rng = np.random.default_rng(args.seed)
    angles = rng.uniform(0, 2 * np.pi, gm.num_components)
    shift = args.perturb * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    student = GaussianMixture.isotropic(
        gm.means + jnp.asarray(shift, gm.means.dtype), 1.1 * jnp.sqrt(gm.eigvals[:, 0]), labels=gm.labels
    )
    drafts = {"frozen": "frozen", "perturbed": student.denoiser(process)}
    x_T = process.prior_sample(jax.random.key(args.seed), (args.toy_batch, 2))

    def check(x, ref):
        counts = [
            np.bincount(np.asarray(gm.component_posterior(v, 1.0, 0.0)).argmax(-1), minlength=25) for v in (x, ref)
        ]
        table = np.stack(counts) + 1  # no empty cells
        return f"classes vs plain: chi2 p={scipy.stats.chi2_contingency(table).pvalue:.2f}"

    return run_problem(
        "toy2d grid (exact mixture denoiser)", process, gm.denoiser(process), drafts, x_T, args, check, log
    )


# ----------------------------------------------------------------------------------------------
# 2. digits


def train_denoiser(images, process, features, blocks, steps, batch, seed, log, label, teacher=None):
    """An eps-prediction MLPResNet trained with the simple loss; returns its denoiser ``(x_t, t) -> x0``.

    With a ``teacher`` denoiser the network is distilled from it instead: its eps prediction
    regresses the teacher's at the same ``x_t`` (the draft error that decides acceptance is
    ``e^lambda |x0_draft - x0_target|``, i.e. the eps error).
    """
    model = MLPResNet(features=features, num_blocks=blocks)
    apply = lambda params: lambda x, t: model.apply({"params": params}, x, 1000.0 * t)  # step-index scale
    params = model.init(jax.random.key(seed), images[:1], jnp.ones((1,)))["params"]
    tx = optax.adam(optax.cosine_decay_schedule(2e-3, steps))
    data = jnp.asarray(images)

    def loss_fn(params, key):
        k_i, k_t, k_e = jax.random.split(key, 3)
        x0 = data[jax.random.randint(k_i, (batch,), 0, data.shape[0])]
        t = losses.sample_t_uniform(k_t, (batch,), process)
        eps = jax.random.normal(k_e, x0.shape)
        if teacher is None:
            return losses.denoising_loss(apply(params), process, x0, t, eps, prediction="eps").mean()
        x_t = process.marginal(x0, t, eps)
        target = jax.lax.stop_gradient(difflax.denoiser_to(teacher, process, "eps")(x_t, t))
        return jnp.mean((apply(params)(x_t, t) - target) ** 2)

    @jax.jit
    def train(params, key):
        def step(carry, k):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, k)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), loss = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(key, steps))
        return params, loss

    start = time.perf_counter()
    params, loss = train(params, jax.random.key(seed + 1))
    loss = np.asarray(loss)
    n_params = sum(p.size for p in jax.tree.leaves(params))
    log(
        f"  trained {label}: MLPResNet(features={features}, num_blocks={blocks}), {n_params} parameters, "
        f"{steps} steps of batch {batch} in {time.perf_counter() - start:.0f}s, "
        f"loss {loss[: max(1, steps // 10)].mean():.3f} -> {loss[-max(1, steps // 10) :].mean():.3f}"
    )
    return difflax.as_denoiser(apply(params), process, "eps")


def digits(args, log):
    process = difflax.VP()
    images, _ = load_digits("train")
    images = images.reshape(len(images), -1)
    log("\ndigits: training the networks")
    target = train_denoiser(
        images, process, args.target_features, args.target_blocks, args.train_steps, 128, args.seed, log, "target"
    )
    drafts = {}
    for name in args.draft:
        if name == "frozen":
            drafts[name] = "frozen"
        elif name == "target":
            drafts[name] = target
        elif name in ("small", "distilled"):  # the same small network, trained on data or distilled
            drafts[name] = train_denoiser(
                images,
                process,
                args.draft_features,
                args.draft_blocks,
                args.train_steps,
                128,
                args.seed + (2 if name == "small" else 3),
                log,
                f"{name} draft",
                teacher=target if name == "distilled" else None,
            )
        elif ":" in name:
            module, fn = name.split(":", 1)
            drafts[fn] = getattr(importlib.import_module(module), fn)(process, target, images)
        else:
            raise SystemExit(
                f"--draft: unknown draft {name!r}; expected frozen, small, distilled, target or MODULE:FUNCTION."
            )
    x_T = process.prior_sample(jax.random.key(args.seed), (args.digits_batch, images.shape[1]))

    def check(x, ref):
        d_mean = np.sqrt(np.mean((x.mean(0) - ref.mean(0)) ** 2))
        d_std = np.sqrt(np.mean((x.std(0) - ref.std(0)) ** 2))
        return f"pixel mean/std RMS diff vs plain {d_mean:.3f}/{d_std:.3f}"

    return run_problem("digits (trained MLPResNet target)", process, target, drafts, x_T, args, check, log)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="toy2d,digits", help="comma-separated: toy2d, digits")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--ks", default="1,2,4,8", help="draft lengths K, comma-separated")
    parser.add_argument("--toy-batch", type=int, default=1024)
    parser.add_argument("--perturb", type=float, default=0.02, help="toy2d: shift of the perturbed draft's means")
    parser.add_argument("--digits-batch", type=int, default=16)
    parser.add_argument(
        "--draft", default="frozen,small,distilled", help="digits drafts: frozen, small, distilled, target, MOD:FN"
    )
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--target-features", type=int, default=128)
    parser.add_argument("--target-blocks", type=int, default=2)
    parser.add_argument("--draft-features", type=int, default=32)
    parser.add_argument("--draft-blocks", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the rows as speculative.json into this directory")
    args = parser.parse_args(argv)
    args.ks = [int(k) for k in args.ks.split(",")]
    args.draft = [d for d in args.draft.split(",") if d]
    problems = [p for p in args.problems.split(",") if p]
    for p in problems:
        if p not in ("toy2d", "digits"):
            raise SystemExit(f"--problems: unknown problem {p!r}; expected toy2d or digits.")

    start = time.perf_counter()
    results = {}

    def log(s=""):
        print(s, flush=True)

    log(f"speculative sampling vs the ancestral sampler; float32, XLA:CPU, {jax.device_count()} device(s)")
    if "toy2d" in problems:
        results["toy2d"] = toy2d(args, log)
    if "digits" in problems:
        results["digits"] = digits(args, log)
    log(f"\ntotal {time.perf_counter() - start:.0f}s")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "speculative.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
        log(f"wrote {out / 'speculative.json'}")


if __name__ == "__main__":
    main()
