"""Solver demo: ``python -m experiments.solver_demo [--config=configs/demo.py] [--workdir=DIR]``.

Samples from the exact denoiser of a 2-D Gaussian mixture with several solvers at a small
step budget, scored against the exact probability-flow ODE endpoint and the exact data
density. It writes ``samples.png`` (samples and ODE trajectories per solver) and
``metrics.json`` to the work directory.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

import difflax
from difflax.analytic import GaussianMixture
from difflax.processes import get_process

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py"), "Recipe file."
)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/solver_demo", "Directory for outputs.")


def ring_mixture(num_modes: int, radius: float, std: float) -> GaussianMixture:
    angles = 2 * np.pi * np.arange(num_modes) / num_modes
    means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return GaussianMixture.isotropic(jnp.asarray(means, jnp.float32), std, labels=np.arange(num_modes))


def run_demo(config, workdir: str) -> dict:
    os.makedirs(workdir, exist_ok=True)
    gm = ring_mixture(config.data.num_modes, config.data.radius, config.data.mode_std)
    process = get_process(config.process)
    denoise = gm.denoiser(process)
    key_data, key_noise, key_sample = jax.random.split(jax.random.key(config.seed), 3)
    n = config.sample.num_samples
    data, _ = gm.sample(key_data, n)
    x_T = process.prior_sample(key_noise, (n, 2))

    @jax.jit
    def reference(x_T):
        return difflax.sample(denoise, process, x_T, solver="heun", steps=config.sample.reference_steps, grid="logsnr")

    x_ref, _ = reference(x_T)
    metrics = {"data_mean_log_prob": float(jnp.mean(gm.log_prob(data)))}
    results = {}
    bar = tqdm(config.sample.solvers, desc="solvers", unit="solver")
    for name in bar:
        solver = difflax.solvers.get_solver(name)
        key = key_sample if solver.stochastic else None
        run = jax.jit(
            lambda x, k, name=name: difflax.sample(
                denoise, process, x, solver=name, steps=config.sample.steps, grid=config.sample.grid,
                key=k, return_trajectory=True,
            )
        )
        jax.block_until_ready(run(x_T, key))  # compile
        start = time.perf_counter()
        x, info = jax.block_until_ready(run(x_T, key))
        seconds = time.perf_counter() - start
        entry = {
            "nfe": int(info["nfe"]),
            "seconds": seconds,
            "mean_log_prob": float(jnp.mean(gm.log_prob(x))),
            # A stochastic sampler does not follow the ODE path, so only its distribution is scored.
            "rms_error_vs_exact_ode": None if solver.stochastic else float(jnp.sqrt(jnp.mean((x - x_ref) ** 2))),
        }
        results[name] = (np.asarray(x), np.asarray(info["trajectory"]))
        metrics[name] = entry
        bar.set_postfix(solver=name, nfe=entry["nfe"], log_prob=f"{entry['mean_log_prob']:.2f}")
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    plot(gm, np.asarray(data), results, metrics, config, os.path.join(workdir, "samples.png"))
    return metrics


def plot(gm, data, results, metrics, config, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim = config.data.radius + 1.0
    grid = np.linspace(-lim, lim, 200)
    xx, yy = np.meshgrid(grid, grid)
    dens = np.exp(np.asarray(gm.log_prob(jnp.asarray(np.stack([xx.ravel(), yy.ravel()], 1), jnp.float32))))
    panels = [("data", data, None), *[(k, v[0], v[1]) for k, v in results.items()]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, pts, traj) in zip(axes[0], panels, strict=True):
        ax.contour(xx, yy, dens.reshape(xx.shape), levels=6, colors="0.75", linewidths=0.6)
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.5, color="tab:blue")
        if traj is not None:
            for i in range(12):
                ax.plot(traj[:, i, 0], traj[:, i, 1], lw=0.8, color="tab:red", alpha=0.8)
            err = metrics[name]["rms_error_vs_exact_ode"]
            title = f"{name}, NFE {metrics[name]['nfe']}"
            ax.set_title(title + (f"\nRMS vs exact ODE {err:.3f}" if err is not None else "\n(stochastic)"), fontsize=9)
        else:
            ax.set_title("data", fontsize=9)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{config.process} process, {config.sample.grid} grid, {config.sample.steps} steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    metrics = run_demo(_CONFIG.value, _WORKDIR.value)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {os.path.join(_WORKDIR.value, 'samples.png')} and metrics.json")


if __name__ == "__main__":
    app.run(main)
