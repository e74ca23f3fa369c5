"""Benchmark: what a difflax sampler costs beyond its network, side by side with diffusers.

1. Overhead per step. The same cheap eps model (``eps = 0.1 x``) on DDPM's linear 1000-step
   schedule, sampled in float32 from the same ``x_T`` by

   * difflax: the jitted :func:`difflax.sample` on ``difflax.as_denoiser(model,
     difflax.DiscreteVP.linear())`` (what a user has), on the grid of the matching diffusers
     scheduler (as ``tests/test_diffusers_conformance.py`` matches them: DDIM, DPM++(2M) and
     UniPC (bh2) directly in ``x`` ending in the final denoising step; Euler and Heun in the
     EDM scaling of diffusers' discrete schedulers, via :func:`difflax.solvers.to_edm`);
   * diffusers: the scheduler loop of its pipelines (``set_timesteps``, then per timestep
     ``scale_model_input``, the model, ``step``) in torch.

   Both sides make the same number of model evaluations (checked) and reach the same sample
   (the largest difference, relative to the largest value, is reported). The cost per step
   is ``(T60 - T10) / 50``, the CPU time of a 60-step run less that of a 10-step run, which
   cancels what a call costs once (dispatch, ``set_timesteps``): the median over ``--repeats``
   rounds, each timing the four runs in turn (so that ``T60`` and ``T10`` of a round see the
   same load), after a warm-up run (compiling excluded). The table gives the ratio
   diffusers / difflax per solver and shape.
2. The loop around a real network. For the digits U-Net (:class:`difflax.models.UNet` of
   ``difflax/configs/digits.py``, 8x8x1) and a DiT-S-like DiT (DiT-S/2 width and heads, ``--dit-depth``
   blocks, 8x8x1), both eps networks on the same process with parameters passed as arguments:
   the CPU time of the jitted ``difflax.sample`` (``--network-steps`` steps, the solver's
   default grid) against ``N_fe`` back-to-back calls of the jitted network alone; median of the
   per-pair ratios over interleaved pairs.
3. Compile time. XLA's compile time (CPU) of each jitted sampler of part 2 against that of the
   jitted network alone (as a ratio, and as the seconds the sampler adds, which do not grow with
   the network), and how many copies of the network the optimized program holds (its
   convolutions, or for the DiT its dots, counted in the compiled HLO text, per network).

XLA:CPU and torch each run one thread per op (``XLA_FLAGS`` below unless set, and
``torch.set_num_threads(1)``); pinning the process to one core (``taskset -c 0``) also keeps
JAX's and torch's helper threads off the other cores. Prints markdown tables and writes them
to ``overhead.md`` in ``--out`` (default ``benchmarks/results/``).

    python -m benchmarks.overhead [--out DIR] [--repeats 31] [--parts overhead,network]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One thread per XLA:CPU op, as torch below: the comparison is single-threaded on both sides.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import jax
import jax.numpy as jnp
import numpy as np

import difflax
from difflax.models import UNet, dit
from difflax.solvers import to_edm

N_TRAIN = 1000
SHAPES = ((256, 16), (16, 3, 32, 32))
STEPS = (10, 60)
DIGITS_UNET = dict(
    base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), num_heads=2,
    dropout=0.0, resblock_updown=False, norm_groups=8, embedding="fourier", fourier_scale=1.0,
)


class Pair(NamedTuple):
    """A difflax solver and the diffusers scheduler it reproduces."""

    label: str
    solver: str
    solver_args: dict
    edm: bool  # stepped in the EDM scaling (diffusers' "discrete" sigma schedulers)
    scheduler: str
    scheduler_args: dict


BASE = {"num_train_timesteps": N_TRAIN, "beta_schedule": "linear", "prediction_type": "epsilon"}
PAIRS = (
    Pair("DDIM", "ddim", {}, False, "DDIMScheduler", dict(set_alpha_to_one=True, clip_sample=False)),
    Pair("DPM++(2M)", "dpmpp_2m", {}, False, "DPMSolverMultistepScheduler", dict(
        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", final_sigmas_type="zero",
        lower_order_final=True)),
    Pair("UniPC", "unipc", dict(order=2, variant="bh2"), False, "UniPCMultistepScheduler", dict(
        solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero")),
    Pair("Euler", "euler", {}, True, "EulerDiscreteScheduler", dict(
        interpolation_type="linear", final_sigmas_type="zero")),
    Pair("Heun", "heun", {}, True, "HeunDiscreteScheduler", {}),
)


def eps_model(x, t):
    """The cheap network of part 1: ``eps = 0.1 x`` (ignores ``t``), for jax and torch alike."""
    return 0.1 * x


# ----------------------------------------------------------------------------------------------
# Timing


def cpu_seconds(fn, number=1):
    """CPU time of one call of ``fn`` (all threads of the process), averaged over ``number`` calls."""
    start = time.process_time()
    for _ in range(number):
        fn()
    return (time.process_time() - start) / number


def calls_for(fn, seconds=2e-3):
    """Back-to-back calls per measurement so that one lasts about ``seconds`` (the clock's tick is far finer)."""
    return max(1, int(seconds / max(cpu_seconds(fn), 1e-7)))


def interleaved_times(fns, repeats):
    """``(repeats, len(fns))`` CPU times of ``fns``, measured in turn: neighbours see the same load."""
    numbers = [calls_for(fn) for fn in fns]
    return np.asarray([[cpu_seconds(fn, n) for fn, n in zip(fns, numbers, strict=True)] for _ in range(repeats)])


# ----------------------------------------------------------------------------------------------
# 1. Overhead per step


def make_scheduler(diffusers, pair, steps):
    scheduler = getattr(diffusers, pair.scheduler)(**BASE, **pair.scheduler_args)
    scheduler.set_timesteps(steps)
    return scheduler


def difflax_problem(pair, scheduler, process, x_T):
    """``(denoise, process, x_T, grid)`` of difflax for ``scheduler``'s time steps (conformance tests' mapping)."""
    denoise = difflax.as_denoiser(eps_model, process, "eps")
    if not pair.edm:  # diffusers' timestep n is difflax time (n + 1) / N; then the final denoising step
        n = scheduler.timesteps.numpy().astype(np.float64)
        return denoise, process, x_T, np.concatenate([(n + 1.0) / N_TRAIN, [0.0]])
    grid = np.unique(scheduler.sigmas.numpy().astype(np.float64))[::-1]  # Heun repeats every interior sigma
    denoise_edm, edm = to_edm(denoise, process)
    return denoise_edm, edm, x_T * np.sqrt(grid[0] ** 2 + 1.0), grid  # x / alpha at the first level


def difflax_sampler(pair, scheduler, process, x_T):
    """The jitted difflax sampler on ``scheduler``'s steps: ``(run, x_start, nfe)``, compiled and warmed up."""
    denoise, proc, x_start, grid = difflax_problem(pair, scheduler, process, x_T)
    grid = jnp.asarray(grid, jnp.float32)
    x_start = jnp.asarray(x_start, jnp.float32)
    sample = jax.jit(lambda x: difflax.sample(
        denoise, proc, x, pair.solver, grid.shape[0] - 1, grid=grid, **pair.solver_args))
    _, info = jax.block_until_ready(sample(x_start))
    return (lambda: jax.block_until_ready(sample(x_start)[0])), x_start, int(info["nfe"])


def diffusers_sampler(torch, scheduler, steps, x_start):
    """diffusers' scheduler loop on ``x_start``: ``run() -> (sample, model calls)``."""
    start = torch.from_numpy(np.asarray(x_start, np.float32))

    def run():
        scheduler.set_timesteps(steps)  # also clears the multistep history
        x, calls = start, 0
        for n in scheduler.timesteps:
            eps = eps_model(scheduler.scale_model_input(x, n), n)
            calls += 1
            x = scheduler.step(eps, n, x).prev_sample
        return x, calls

    return run


def overhead_cell(torch, diffusers, pair, process, shape, repeats):
    """Per-step CPU time of difflax and diffusers at ``shape``, and the samples' largest difference (relative)."""
    x_T = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    runs, diff = [], 0.0
    for steps in STEPS:
        scheduler = make_scheduler(diffusers, pair, steps)
        run_difflax, x_start, nfe = difflax_sampler(pair, scheduler, process, x_T)
        run_diffusers = diffusers_sampler(torch, scheduler, steps, x_start)
        want, calls = run_diffusers()
        if nfe != calls:
            raise AssertionError(f"{pair.label} at {steps} steps: difflax makes {nfe} evaluations, diffusers {calls}")
        want = want.numpy()
        diff = max(diff, float(np.max(np.abs(np.asarray(run_difflax()) - want)) / np.max(np.abs(want))))
        runs += [run_difflax, run_diffusers]
    t = interleaved_times(runs, repeats)
    per_step = np.median(t[:, 2:] - t[:, :2], axis=0) / (STEPS[1] - STEPS[0])  # paired: T60 - T10 of one round
    return per_step[0], per_step[1], diff


def overhead_table(torch, diffusers, repeats):
    process = difflax.DiscreteVP.linear()
    cells = {}
    for shape in SHAPES:
        for pair in PAIRS:
            ours, theirs, diff = overhead_cell(torch, diffusers, pair, process, shape, repeats)
            cells[shape, pair.label] = (ours, theirs, diff)
            print(f"  {shape!s:16s} {pair.label:10s} difflax {ours * 1e6:8.1f} us/step   diffusers "
                  f"{theirs * 1e6:8.1f} us/step   ratio {theirs / ours:6.1f}x   relative diff {diff:.1e}", flush=True)
    return cells


# ----------------------------------------------------------------------------------------------
# 2 and 3. Real networks: the loop's cost and compile time


def networks(batch, dit_depth):
    """``{name: (apply(params, x, t), params, x)}``: the digits U-Net and a DiT-S-like DiT on 8x8x1 images."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, 8, 8, 1)), jnp.float32)
    t = jnp.full((batch,), 0.5, jnp.float32)
    models = {
        "digits U-Net": UNet(**DIGITS_UNET),
        f"DiT-S/2, depth {dit_depth}": dit("S/2", depth=dit_depth, num_classes=None),
    }
    out = {}
    for name, model in models.items():
        params = jax.jit(model.init)(jax.random.key(0), x, t)["params"]
        out[name] = (lambda p, x, t, model=model: model.apply({"params": p}, x, t)), params, x
    return out


def sampler_fn(apply, process, solver, steps):
    """``sample(params, x_T) -> (x0, nfe)``: difflax.sample on the eps network, parameters as an argument."""

    def sample(params, x_T):
        denoise = difflax.as_denoiser(lambda x, t: apply(params, x, t), process, "eps")
        x, info = difflax.sample(denoise, process, x_T, solver, steps)
        return x, info["nfe"]

    return sample


def compiled(fn, *args):
    """``(executable, seconds)``: ``fn`` lowered and compiled by XLA; the seconds are the compile's CPU time."""
    lowered = jax.jit(fn).lower(*args)
    start = time.process_time()
    exe = lowered.compile()
    return exe, time.process_time() - start


def network_ops(exe, name):
    """The network's ops in a compiled program: its convolutions (U-Net) or else its dots (DiT)."""
    text = exe.as_text()
    return text.count(" convolution(") if "U-Net" in name else text.count(" dot(")


def network_rows(args):
    process = difflax.DiscreteVP.linear()
    rows = []
    for name, (apply, params, x) in networks(args.network_batch, args.dit_depth).items():
        t = jnp.full((x.shape[0],), 0.5, jnp.float32)
        net, net_compile = compiled(apply, params, x, t)
        ops = network_ops(net, name)
        for pair in PAIRS:
            exe, sampler_compile = compiled(sampler_fn(apply, process, pair.solver, args.network_steps), params, x)
            nfe = int(jax.block_until_ready(exe(params, x))[1])

            def calls(nfe=nfe):
                y = x
                for _ in range(nfe):
                    y = net(params, y, t)
                return jax.block_until_ready(y)

            pairs = np.asarray([(cpu_seconds(calls), cpu_seconds(lambda exe=exe: jax.block_until_ready(exe(params, x))))
                                for _ in range(args.repeats)])
            ratio = float(np.median(pairs[:, 1] / pairs[:, 0]))
            copies = network_ops(exe, name) / ops
            rows.append((name, pair.label, nfe, float(np.median(pairs[:, 0])) / nfe, ratio,
                         sampler_compile / net_compile, copies, net_compile))
            print(f"  {name:18s} {pair.label:10s} NFE {nfe:3d}  sampler / (NFE x network) {ratio:.3f}  "
                  f"compile {sampler_compile:.2f}s / {net_compile:.2f}s = {sampler_compile / net_compile:.2f}x  "
                  f"network copies {copies:g}", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# Report


def overhead_markdown(cells):
    labels = [p.label for p in PAIRS]
    header = ["| shape | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]

    def table(cell):
        return [f"| {shape} | " + " | ".join(cell(*cells[shape, lab]) for lab in labels) + " |" for shape in SHAPES]

    worst = max(diff for *_, diff in cells.values())
    return [*header, *table(lambda ours, theirs, _: f"{theirs / ours:.1f}x"), "",
            "CPU time per step, us (difflax / diffusers):", "",
            *header, *table(lambda ours, theirs, _: f"{ours * 1e6:.1f} / {theirs * 1e6:.0f}"), "",
            f"Largest difference between the two samples, relative to their largest value: {worst:.1e}."]


def network_markdown(rows):
    lines = ["| network | solver | NFE | network ms | sampler / (NFE x network) | compile: sampler / network "
             "| compile added | network copies |", "|---|---|---|---|---|---|---|---|"]
    for name, label, nfe, t_net, ratio, compile_ratio, copies, net_compile in rows:
        added = (compile_ratio - 1.0) * net_compile
        lines.append(f"| {name} | {label} | {nfe} | {t_net * 1e3:.2f} | {ratio:.3f} | "
                     f"{compile_ratio:.2f}x (network {net_compile:.1f} s) | {added:+.2f} s | {copies:g} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--parts", default="overhead,network", help="overhead and/or network (parts 2 and 3)")
    parser.add_argument("--repeats", type=int, default=31, help="interleaved repetitions (medians)")
    parser.add_argument("--network-batch", type=int, default=16)
    parser.add_argument("--network-steps", type=int, default=10)
    parser.add_argument("--dit-depth", type=int, default=4, help="DiT-S has 12 blocks; fewer keep the run short")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    command = " ".join(["python -m benchmarks.overhead", *(sys.argv[1:] if argv is None else argv)])
    lines = [f"`{command}`", "", f"jax {jax.__version__}, XLA_FLAGS={os.environ['XLA_FLAGS']!r}, float32, CPU time", ""]

    if "overhead" in parts:
        try:
            import diffusers
            import torch
        except ImportError as err:  # the bench extra
            raise SystemExit(f"benchmarks.overhead needs the bench extra (torch CPU and diffusers): {err}") from None
        torch.set_num_threads(1)
        print(f"[overhead] per-step CPU time, (T{STEPS[1]} - T{STEPS[0]}) / {STEPS[1] - STEPS[0]}, "
            f"median of {args.repeats}; diffusers {diffusers.__version__}, torch {torch.__version__}")
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            cells = overhead_table(torch, diffusers, args.repeats)
        lines += ["Per-step overhead, diffusers / difflax (cheap eps model, DDPM linear schedule):", "",
                  *overhead_markdown(cells), ""]
    if "network" in parts:
        print(f"[network] batch {args.network_batch}, {args.network_steps} steps, median of {args.repeats} pairs")
        rows = network_rows(args)
        lines += [f"Jitted sample against NFE x the jitted network, and compile time (batch {args.network_batch}, "
                  f"{args.network_steps} steps, default grids):", "", *network_markdown(rows), ""]
    report = "\n".join(lines)
    print("\n" + report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.md").write_text(report)
    print(f"wrote {out / 'overhead.md'}")


if __name__ == "__main__":
    main()
