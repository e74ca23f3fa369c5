"""Benchmark: few-step samplers on the digits teacher of the main job, by Frechet digits distance.

The teacher is the default recipe (``difflax/configs/digits.py``: a class-conditional EDM U-Net),
trained in ``--workdir`` or restored from there (the same teacher as :mod:`benchmarks.distill`).
Every sampler starts from the same ``--num`` test draws ``x_T`` with balanced labels and is scored
by the Frechet digits distance (FDD, :mod:`difflax.metrics.digits`) to the held-out digits:

* the teacher's reference: Heun on the Karras grid with 18 steps (35 NFE), and DPM-Solver++(2M)
  with 35 steps;
* at each of ``--nfes`` (5 and 10): every deterministic named solver (DDIM, Euler, DPM-Solver++(2M)
  and (3M), UniPC-bh2, DEIS, iPNDM) on every named grid, each solver on its best grid;
* the fitted samplers, on ``--calibration`` draws disjoint from the test draws: ``optimize_grid``
  with its defaults (DPM-Solver++(2M) and iPNDM), LD3 learned time steps
  (:func:`difflax.solvers.fit_ld3`, DPM-Solver++(2M), iPNDM and UniPC-bh2) and EPD parallel directions
  (:func:`difflax.solvers.fit_epd`, ``K = 1`` where the NFE allows), each with its fitting time
  (compilation included).

The fitted samplers take a denoiser whose batch is the calibration draws' (a subset of them for
their held-out guard), so they are fitted on the teacher's unconditional denoiser (the null class
of classifier-free guidance, which the recipe trains with ``p_uncond``) and then used, unchanged, for
the class-conditional test samples: a denoiser they were not fitted on. Their unconditional test
samples are scored as well (``uncond`` column).

Prints one table (method, NFE, FDD, ratio to the best named solver and grid at the same NFE, ratio
to the teacher's 35-NFE FDD, fitting seconds) and writes ``few_step.json`` and ``few_step.png``
(FDD against NFE) into ``--out``.

    python -m benchmarks.few_step [--workdir workdir/distill] [--num 500] [--calibration 64] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

import difflax
from benchmarks.distill import Scorer, teacher_network
from benchmarks.solvers import steps_for
from difflax.solvers import fit_epd, fit_ld3, optimize_grid

GRIDS = ("uniform", "trailing", "logsnr", "karras", "edm")
NAMED = [  # label, registry name, hyper-parameters
    ("ddim", "ddim", {}),
    ("euler", "euler", {}),
    ("dpmpp_2m", "dpmpp_2m", {}),
    ("dpmpp_3m", "dpmpp_3m", {}),
    ("unipc-bh2", "unipc", {"variant": "bh2"}),
    ("deis", "deis", {}),
    ("ipndm", "ipndm", {}),
]
FITTED = [  # label, kind, registry name, hyper-parameters, evaluations per step
    ("optimize_grid dpmpp_2m", "oss", "dpmpp_2m", {}, 1),
    ("optimize_grid ipndm", "oss", "ipndm", {}, 1),
    ("ld3 dpmpp_2m", "ld3", "dpmpp_2m", {}, 1),
    ("ld3 ipndm", "ld3", "ipndm", {}, 1),
    ("ld3 unipc-bh2", "ld3", "unipc", {"variant": "bh2"}, 1),
    ("epd K=1", "epd", None, {}, 2),
]


def sampler(denoise, process, solver, steps, **kwargs):
    """Jitted ``(x_T, grid) -> x``: one compile per solver and step count serves every grid."""
    def run(x, grid):
        return difflax.sample(denoise, process, x, solver=solver, steps=steps, grid=grid, final_zero=True, **kwargs)[0]

    return jax.jit(run)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="workdir/distill")
    parser.add_argument("--num", type=int, default=500, help="test draws scored per row")
    parser.add_argument("--calibration", type=int, default=64, help="calibration draws of the fitted samplers")
    parser.add_argument("--nfes", default="5,10")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    nfes = [int(n) for n in args.nfes.split(",")]
    os.makedirs(args.out, exist_ok=True)

    trainer, teacher = teacher_network("digits", args.workdir)
    process = teacher.process
    score = Scorer("digits", trainer, args.num)
    key = jax.random.key(2024)
    x_T = process.prior_sample(jax.random.fold_in(key, 0), (args.num, *teacher.example_shape))
    x_cal = process.prior_sample(jax.random.fold_in(key, 1), (args.calibration, *teacher.example_shape))
    y = jnp.arange(args.num) % teacher.num_classes
    conditional, unconditional = teacher.denoiser(y=y), teacher.denoiser()
    rows = []

    def record(method, nfe, x, grid=None, seconds=None, uncond=None):
        rows.append({"method": method, "nfe": nfe, "fdd": score(x), "grid": grid, "fit_seconds": seconds,
                     "uncond_fdd": None if uncond is None else score(uncond)})
        r = rows[-1]
        print(f"{method:24s} {grid or '':9s} NFE {nfe:3d}  FDD {r['fdd']:8.3f}"
              + (f"  uncond {r['uncond_fdd']:8.3f}" if uncond is not None else "")
              + (f"  fit {seconds:6.1f}s" if seconds is not None else ""), flush=True)

    for solver, steps in (("heun", 18), ("dpmpp_2m", 35)):
        grid = difflax.solvers.make_grid("karras" if solver == "heun" else "logsnr", process, steps)
        record(f"teacher {solver}", 2 * steps - 1 if solver == "heun" else steps,
               sampler(conditional, process, solver, steps)(x_T, grid), grid="karras" if solver == "heun" else "logsnr")

    for nfe in nfes:
        for label, name, kwargs in NAMED:
            steps = steps_for(nfe, 1)
            run = sampler(conditional, process, name, steps, **kwargs)
            for g in GRIDS:
                record(label, nfe, run(x_T, difflax.solvers.make_grid(g, process, steps)), grid=g)
        for label, kind, name, kwargs, per_step in FITTED:
            steps = steps_for(nfe, per_step)
            if steps is None or steps < 2:
                continue
            t0 = time.perf_counter()
            if kind == "oss":
                grid = optimize_grid(unconditional, process, x_cal, solver=name, steps=steps, **kwargs)
                seconds = time.perf_counter() - t0
                x = sampler(conditional, process, name, steps, **kwargs)(x_T, grid)
                u = sampler(unconditional, process, name, steps, **kwargs)(x_T, grid)
            else:
                fitted = (fit_ld3(unconditional, process, x_cal, name, steps, **kwargs) if kind == "ld3"
                          else fit_epd(unconditional, process, x_cal, steps, points=1))
                seconds = time.perf_counter() - t0
                x = jax.jit(lambda x, d: difflax.sample(d, process, x, solver=fitted, steps=fitted.steps)[0],
                            static_argnums=1)
                x, u = x(x_T, conditional), x(x_T, unconditional)
            record(label, nfe, x, grid="fitted", seconds=seconds, uncond=u)

    reference = next(r["fdd"] for r in rows if r["method"] == "teacher heun")
    best_named = {nfe: min(r["fdd"] for r in rows if r["nfe"] == nfe and r["grid"] in GRIDS) for nfe in nfes}
    lines = ["| method | grid | NFE | FDD | / best named at this NFE | / teacher 35 NFE | fit s | FDD unconditional |",
             "|---|---|---|---|---|---|---|---|"]
    shown = [r for r in rows if r["grid"] not in GRIDS or r["method"].startswith("teacher")]
    for nfe in nfes:  # each named solver on its best grid
        for label, _, _ in NAMED:
            shown.append(min((r for r in rows if r["method"] == label and r["nfe"] == nfe), key=lambda r: r["fdd"]))
    for r in sorted(shown, key=lambda r: (r["nfe"], r["fdd"])):
        ratio = "" if r["nfe"] not in best_named else f"{r['fdd'] / best_named[r['nfe']]:.2f}"
        fit = "" if r["fit_seconds"] is None else f"{r['fit_seconds']:.0f}"
        uncond = "" if r["uncond_fdd"] is None else f"{r['uncond_fdd']:.2f}"
        lines.append(f"| {r['method']} | {r['grid']} | {r['nfe']} | {r['fdd']:.2f} | {ratio} | "
                     f"{r['fdd'] / reference:.2f} | {fit} | {uncond} |")
    print("\n".join(lines))
    with open(os.path.join(args.out, "few_step.json"), "w") as f:
        json.dump({"rows": rows, "floor": score.floor, "table": lines}, f, indent=1)
    plot(os.path.join(args.out, "few_step.png"), rows, nfes, reference)


def plot(path, rows, nfes, reference):
    """FDD against NFE: named solvers (best grid) dashed, fitted samplers solid, each with its own colour and
    marker; the teacher's 35-NFE FDD as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab20").colors
    markers = "osv^D<>ph*XPd"
    labels = [(label, "--") for label, *_ in NAMED] + [(label, "-") for label, *_ in FITTED]
    for i, (label, line) in enumerate(labels):
        points = [(nfe, min((r["fdd"] for r in rows if r["method"] == label and r["nfe"] == nfe), default=None))
                  for nfe in nfes]
        points = [(n, v) for n, v in points if v is not None]
        if points:
            ax.plot(*zip(*points, strict=True), line, color=colors[i % len(colors)], marker=markers[i % len(markers)],
                    lw=2.2 if line == "-" else 1.2, ms=7, label=label if line == "-" else f"{label} (best grid)")
    ax.axhline(reference, color="k", lw=0.8, label="teacher, Heun 35 NFE")
    ax.set(xlabel="NFE", ylabel="Frechet digits distance (lower is better)", xticks=nfes,
           title="Digits teacher: named solvers (dashed) and fitted samplers (solid)")
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
