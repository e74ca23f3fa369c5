"""Benchmark: few-step students distilled from a trained teacher, against the teacher's own samplers.

On ``--data digits`` (the default recipe, ``difflax/configs/digits.py``: a class-conditional EDM
U-Net) or ``--data toy2d`` (``difflax/configs/toy2d_edm.py``: the 5x5 Gaussian grid, an EDM-preconditioned MLP), the
teacher is trained in ``--workdir`` (or restored from there), then every method of
:mod:`difflax.train.distill` is trained from it:

* progressive distillation from ``--pd-start`` DDIM steps down to 4 (and the rounds in between),
* consistency distillation (Heun teacher, 18 levels, pseudo-Huber, target EMA 0.95) and
  consistency training with the improved recipe (log-normal levels, 1/gap weighting,
  doubling curriculum, no EMA target) and easy consistency tuning (ECT: consistency training from the
  teacher's weights on continuous levels, the gap shrinking over 8 stages), sampled in 1 and 2 steps,
* reflow on ``--pairs`` teacher couplings, sampled with 1, 2 and 4 Euler steps, with the
  straightness of the teacher's and the student's paths,
* DMD into a one-step generator (with the L2 regression to teacher pairs), and DMD2 (two time-scale
  update, GAN head on the fake denoiser's features, no regression) at the levels ``--dmd-times``, sampled
  with 1, 2 and 4 of them (``--dmd2-gan`` and ``--dmd2-fake-updates`` override the paper's weights and
  its 5 fake-denoiser steps per generator step),
* MeanFlow and shortcut models distilled from the teacher's velocity (flow reading), sampled with 1, 2
  and 4 steps of the average velocity,
* sCM distillation (TrigFlow reading, tangent normalization and warm-up, adaptive weighting), sampled in
  1 and 2 steps,
* guidance distillation (digits only), compared with the teacher's classifier-free guidance at
  the same ``w`` and steps (the student makes half the network calls), and its stage two: progressive
  distillation of the guided student (``w`` drawn per example) from 16 to 4 DDIM steps,
* Adv-KD (one pass through its stage networks).

Every sampler starts from the same ``--num`` noise draws and balanced labels. Scores: the
Frechet digits distance (FDD, :mod:`difflax.metrics.digits`) to the held-out digits, or
the sliced Wasserstein distance to fresh toy data (exact data, many projections) with the number of
the grid's 25 modes that hold at least a fifth of their share of samples within 3 standard deviations. The
table has method, network evaluations (NFE), the distance, its ratio to the teacher at 35
NFE, the ratio to the teacher's best sampler at the same NFE, and training wall time.
Writes ``distill_<data>.json`` and ``distill_<data>.png`` (samples) to ``--out``.

    python -m benchmarks.distill [--data digits|toy2d] [--steps 1500] [--workdir DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import difflax
from difflax import distill
from difflax.data import load_digits, make_dataset
from difflax.train import Trainer, builders
from difflax.train import distill as students

TEACHER_BASELINES = [  # (solver, steps) -> NFE: euler/ddim 1 per step, heun 2 per step - 1, dpmpp_2m 1 per step
    ("euler", 1),
    ("euler", 2),
    ("heun", 2),
    ("euler", 4),
    ("dpmpp_2m", 2),
    ("dpmpp_2m", 4),
    ("heun", 3),
    ("dpmpp_2m", 8),
    ("heun", 18),
]


def teacher_network(data: str, workdir: str):
    from difflax.configs import digits, toy2d_edm

    config = digits.get_config() if data == "digits" else toy2d_edm.get_config()
    config.train.save_every = 10**9
    trainer = Trainer(config, os.path.join(workdir, f"teacher_{data}"))
    state, _ = trainer.run(progress=False)
    return trainer, students.Network.from_trainer(trainer, state.ema_params)


class Scorer:
    """FDD on digits (held-out test digits), sliced W2 on toy data (fresh exact samples)."""

    def __init__(self, data: str, trainer, num: int):
        self.data, self.num = data, num
        if data == "digits":
            from difflax.metrics.digits import load_or_train_digits_classifier

            train, train_labels = load_digits("train")
            test, test_labels = load_digits("test")
            self.clf = load_or_train_digits_classifier((train, train_labels, test, test_labels), trainer.workdir)
            self.reference = self.clf.stats(test)
            self.floor = self(train[:num])
        else:
            from difflax.data.toy2d import toy_mixture

            self.fresh = toy_mixture("grid").sample(jax.random.key(123), num)[0]
            self.floor = self(toy_mixture("grid").sample(jax.random.key(321), num)[0])

    def __call__(self, x) -> float:
        x = np.asarray(jax.device_get(x), np.float32)
        if self.data == "digits":
            from difflax.metrics.digits import frechet_digits_distance

            return float(frechet_digits_distance(x, self.clf, self.reference))
        from difflax.metrics.sample_based import sliced_wasserstein

        return float(sliced_wasserstein(jnp.asarray(x), self.fresh, key=jax.random.key(0), num_projections=512))

    def modes(self, x) -> int | None:
        """Grid modes holding at least a fifth of their share of ``x`` within 3 standard deviations (toy only)."""
        if self.data == "digits":
            return None
        from difflax.data.toy2d import toy_mixture

        grid = toy_mixture("grid")
        means, std = np.asarray(grid.means), 0.08
        dist = np.linalg.norm(np.asarray(x, np.float32)[:, None] - means[None], axis=-1)
        counts = np.bincount(dist.argmin(1)[dist.min(1) < 3 * std], minlength=len(means))
        return int(np.sum(counts >= 0.2 * len(x) / len(means)))


def straightness_of(denoise, process, x_T, steps=64):
    """Mean straightness of the sampler's paths (Euler on a fine uniform grid of the Flow reading)."""
    _, info = difflax.sample(
        denoise, process, x_T, solver="euler", steps=steps, grid="uniform", return_trajectory=True, final_zero=False
    )
    return float(jnp.mean(distill.straightness(info["trajectory"], info["ts"])))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=["digits", "toy2d"], default="digits")
    parser.add_argument("--steps", type=int, default=1500, help="training steps per method (PD: per round)")
    parser.add_argument("--pd-start", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=4096)
    parser.add_argument(
        "--dmd-times", default=None, help="DMD / DMD2 generator levels, comma-separated (default t_max)"
    )
    parser.add_argument("--dmd-lr", type=float, default=1e-4)
    parser.add_argument(
        "--dmd2-gan", default=None, help="DMD2 GAN weights GENERATOR,DISCRIMINATOR (default: the runner's, DMD2's)"
    )
    parser.add_argument(
        "--dmd2-fake-updates", type=int, default=None, help="DMD2 fake-denoiser steps per generator step"
    )
    parser.add_argument("--scm-p", default="-1.0,1.4", help="sCM log-normal time distribution: P_mean,P_std")
    parser.add_argument("--num", type=int, default=500, help="samples scored per row")
    parser.add_argument("--methods", default="pd,cd,ct,ect,reflow,dmd,dmd2,meanflow,shortcut,scd,guidance,advkd")
    parser.add_argument("--workdir", default="workdir/distill")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    methods = args.methods.split(",")
    os.makedirs(args.out, exist_ok=True)

    t0 = time.perf_counter()
    trainer, teacher = teacher_network(args.data, args.workdir)
    teacher_seconds = time.perf_counter() - t0
    process = teacher.process
    score = Scorer(args.data, trainer, args.num)
    key = jax.random.key(2024)
    x_T = process.prior_sample(jax.random.fold_in(key, 0), (args.num, *teacher.example_shape))
    y = None if teacher.num_classes is None else jnp.arange(args.num) % teacher.num_classes
    rows, images = [], {}

    def record(method, nfe, x, seconds=None, **extra):
        fdd = score(x)
        modes = score.modes(x)
        extra = extra if modes is None else {**extra, "modes": modes}
        rows.append({"method": method, "nfe": int(nfe), "distance": fdd, "train_seconds": seconds, **extra})
        images[f"{method} ({nfe})"] = np.asarray(x[:20] if args.data == "digits" else x[:1000])
        print(
            f"{method:40s} NFE {nfe:3d}  distance {fdd:8.4f}"
            + (f"  train {seconds:7.1f}s" if seconds else "")
            + ("" if modes is None else f"  modes {modes}/25"),
            flush=True,
        )

    teacher_denoise = teacher.denoiser(y=y)
    for solver, steps in TEACHER_BASELINES:
        x, info = jax.jit(
            lambda x: difflax.sample(teacher_denoise, process, x, solver=solver, steps=steps, grid="karras")
        )(x_T)
        record(f"teacher {solver} {steps} steps", int(info["nfe"]), x, teacher_seconds if steps == 18 else None)

    data = make_dataset(trainer.config.data.name, "train", trainer.config.data.get("image_size"))

    def k(i):
        return jax.random.fold_in(key, 100 + i)

    def sample(student, **kw):
        return jax.jit(lambda p, x: student.sample(p, k(99), x, y, **kw))(student.params, x_T)

    if "pd" in methods:
        student = students.progressive(
            teacher, data, k(1), start_steps=args.pd_start, end_steps=4, steps_per_round=args.steps
        )
        record("progressive distillation", 4, sample(student), student.seconds)
    for name, kwargs in (
        ("cd", dict(distill_from_teacher=True)),
        (
            "ct",
            dict(
                distill_from_teacher=False, curriculum="ict", noise="lognormal", weighting="inverse_gap", target_ema=0.0
            ),
        ),
        ("ect", dict(distill_from_teacher=False, curriculum="ect")),
    ):
        if name in methods:
            student = students.consistency(teacher, data, k(2), steps=args.steps, **kwargs)
            label = {
                "cd": "consistency distillation",
                "ct": "consistency training (iCT recipe)",
                "ect": "easy consistency tuning (ECT)",
            }[name]
            for n in (1, 2):
                record(label, n, sample(student, steps=n), student.seconds)
    if "reflow" in methods:
        student, _ = students.reflow(
            teacher,
            k(3),
            num_pairs=args.pairs,
            steps=args.steps,
            pairs_path=os.path.join(args.workdir, f"pairs_{args.data}"),
        )
        flow = students.flow_of(process)
        z = x_T * flow.sigma(flow.t_max) / process.sigma(jnp.asarray(process.t_max, jnp.float32))
        before = straightness_of(teacher.denoiser(y=y, process=flow), flow, z)
        after = straightness_of(teacher.denoiser(student.params, y, process=flow), flow, z)
        for n in (1, 2, 4):
            record(
                "reflow",
                n,
                sample(student, steps=n),
                student.seconds,
                straightness_teacher=before,
                straightness_student=after,
            )
    levels = None if args.dmd_times is None else tuple(float(t) for t in args.dmd_times.split(","))
    if "dmd" in methods:
        student = students.dmd(
            teacher, k(4), steps=args.steps, learning_rate=args.dmd_lr, generator_times=levels and levels[:1]
        )
        record("DMD", 1, sample(student), student.seconds)
    if "dmd2" in methods:
        dmd2_kwargs = {}
        if args.dmd2_gan is not None:
            dmd2_kwargs["gan_weight"], dmd2_kwargs["critic_weight"] = (float(v) for v in args.dmd2_gan.split(","))
        if args.dmd2_fake_updates is not None:
            dmd2_kwargs["fake_updates"] = args.dmd2_fake_updates
        student = students.dmd2(
            teacher, data, k(9), steps=args.steps, learning_rate=args.dmd_lr, generator_times=levels, **dmd2_kwargs
        )
        for n in [n for n in (1, 2, 4) if n <= len(levels or (0,))]:
            record("DMD2", n, sample(student, steps=n), student.seconds)
    for name in ("meanflow", "shortcut"):
        if name in methods:
            student = getattr(students, name)(teacher, data, k(7), steps=args.steps)
            for n in (1, 2, 4):
                record(name if name == "meanflow" else "shortcut model", n, sample(student, steps=n), student.seconds)
    if "scd" in methods:
        p_mean, p_std = (float(v) for v in args.scm_p.split(","))
        student = students.scm(teacher, data, k(8), steps=args.steps, p_mean=p_mean, p_std=p_std)
        for n in (1, 2):
            record("sCM distillation", n, sample(student, steps=n), student.seconds)
    if "guidance" in methods and teacher.num_classes is not None:
        w = 1.0
        student = students.guidance(
            teacher,
            data,
            k(5),
            steps=args.steps,
            sample_t=lambda kk, shape: builders.sample_t(trainer.config.loss, kk, shape, process),
        )
        guided = difflax.guidance.cfg(
            lambda x, t, yy: teacher.denoiser(y=yy)(x, t), y, w, null=teacher.num_classes, convention="w"
        )
        for steps in (18, 4):
            x, info = jax.jit(lambda x: difflax.sample(guided, process, x, solver="heun", steps=steps))(x_T)
            record(f"teacher CFG w={w} heun {steps}", 2 * int(info["nfe"]), x)
            record(
                f"guidance-distilled w={w} heun {steps}",
                int(info["nfe"]),
                sample(student, steps=steps, w=w),
                student.seconds,
            )
        stage2 = students.progressive(
            students.guided_network(teacher, student), data, k(10), start_steps=16, end_steps=4,
            steps_per_round=args.steps, w_range=(0.0, 4.0),
        )  # fmt: skip
        record(f"guidance-distilled + progressive w={w}", 4, sample(stage2, w=w), student.seconds + stage2.seconds)
    if "advkd" in methods:  # an unconditional student of the teacher's null-class (unconditional) denoiser
        from difflax.train.advkd import train_advkd

        uncond = teacher.denoiser()
        x, _ = jax.jit(lambda x: difflax.sample(uncond, process, x, solver="heun", steps=18))(x_T)
        record("teacher unconditional heun 18 steps", 35, x)
        result = train_advkd(
            uncond,
            process,
            teacher.example_shape,
            k(6),
            steps=args.steps,
            solver="heun",
            teacher_steps=18,
            regression_weight=1.0,
            adversarial_weight=0.1,
            learning_rate=1e-3,
            critic_learning_rate=2e-3,
        )
        record("Adv-KD (unconditional; regression + WGAN-GP)", 1, result.from_noise(x_T), result.seconds)

    by_nfe = {}
    for r in rows:
        if r["method"].startswith("teacher ") and "CFG" not in r["method"] and "unconditional" not in r["method"]:
            by_nfe[r["nfe"]] = min(by_nfe.get(r["nfe"], np.inf), r["distance"])
    reference = next(r["distance"] for r in rows if r["method"] == "teacher heun 18 steps")
    print(f"\n{args.data}: teacher trained {teacher_seconds:.0f}s; real-data floor {score.floor:.4f}")
    print(f"{'method':40s} {'NFE':>4s} {'distance':>9s} {'/teacher35':>10s} {'/teacher@NFE':>12s} {'train s':>8s}")
    for r in rows:
        same = min((v for n, v in by_nfe.items() if n <= r["nfe"]), default=np.nan)
        r["ratio_teacher_35"] = r["distance"] / reference
        r["ratio_teacher_same_nfe"] = r["distance"] / same
        secs = f"{r['train_seconds']:.0f}" if r["train_seconds"] else ""
        print(
            f"{r['method']:40s} {r['nfe']:4d} {r['distance']:9.4f} {r['ratio_teacher_35']:10.2f} "
            f"{r['ratio_teacher_same_nfe']:12.2f} {secs:>8s}"
        )
    out = Path(args.out)
    with open(out / f"distill_{args.data}.json", "w") as f:
        json.dump(
            {"data": args.data, "steps": args.steps, "num": args.num, "floor": score.floor, "rows": rows}, f, indent=2
        )
    plot(images, out / f"distill_{args.data}.png", args.data)


def plot(images: dict, path, data: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(images)
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 0.9 * len(names) + 0.5), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        x = images[name]
        if data == "digits":
            ax.imshow(np.concatenate(list(x[..., 0]), axis=1), cmap="gray_r")
        else:
            ax.scatter(x[:, 0], x[:, 1], s=4)
        ax.set_title(name, fontsize=8, loc="left")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
