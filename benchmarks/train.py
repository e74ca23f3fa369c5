"""Training throughput: steps/s and images/s of the digits and a CIFAR-size recipe on this machine,
and the overhead of the sharded step on 8 CPU devices against 1 device at the same global batch.

``python -m benchmarks.train [--steps 20] [--cifar_batch 16]``

The 8-device comparison runs in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the flag must be set before JAX starts).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(config, steps: int, devices=None, dataset=None) -> dict:
    """Time ``steps`` jitted train steps after one warm-up (compile) step; also the step's FLOPs
    (:func:`difflax.train.throughput.step_flops`), the parameter count and the mesh."""
    import tempfile

    import jax

    from difflax.train import Trainer, make_mesh, shard_batch
    from difflax.train.throughput import step_flops

    mesh = None if devices is None else make_mesh(jax.devices()[:devices])  # None: the recipe's mesh
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(config, workdir, mesh=mesh, dataset=dataset)
        state = trainer.init_state()
        batches = [
            shard_batch(trainer.dataset.batch(0, i, config.train.batch_size), trainer.mesh) for i in range(steps + 1)
        ]
        flops = step_flops(trainer._step.lower(state, batches[0]))
        params = sum(x.size for x in jax.tree.leaves(state.params))
        state, metrics = trainer._step(state, batches[0])
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for batch in batches[1:]:
            state, metrics = trainer._step(state, batch)
        jax.block_until_ready(metrics)
        seconds = time.perf_counter() - start
    return {"steps_per_sec": steps / seconds, "images_per_sec": steps * config.train.batch_size / seconds,
            "flops_per_step": flops, "params": params, "mesh": dict(trainer.mesh.shape)}


def cifar_like_config(batch: int):
    """The DDPM++ CIFAR-10 network at 32x32x3, fed with random images of that size."""
    from difflax.configs import digits

    config = digits.get_config()
    config.model.kwargs.base_channels = 128
    config.model.kwargs.channel_mult = (1, 2, 2, 2)
    config.model.kwargs.num_res_blocks = 2
    config.model.kwargs.attention_resolutions = (16,)
    config.model.kwargs.norm_groups = 32
    config.model.kwargs.num_heads = 4
    config.train.batch_size = batch
    return config


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cifar_batch", type=int, default=16)
    parser.add_argument("--skip_cifar", action="store_true")
    parser.add_argument("--sharded_only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from difflax.configs import digits

    if args.sharded_only:  # child process with 8 CPU devices
        config = digits.get_config()
        out = {n: measure(config, args.steps, devices=n) for n in (1, 8)}
        print(json.dumps(out))
        return

    import numpy as np

    from difflax.data import ArrayDataset

    rng = np.random.default_rng(0)
    cifar_like = ArrayDataset(
        images=rng.uniform(-1, 1, (512, 32, 32, 3)).astype(np.float32), labels=rng.integers(0, 10, 512)
    )
    rows = [("digits (UNet, 8x8x1)", digits.get_config(), None)]
    if not args.skip_cifar:
        rows.append(("CIFAR-size (DDPM++ UNet, 32x32x3)", cifar_like_config(args.cifar_batch), cifar_like))
    print(f"{'recipe':48s} {'batch':>6s} {'steps/s':>9s} {'images/s':>9s}")
    for name, config, dataset in rows:
        r = measure(config, args.steps, dataset=dataset)
        print(f"{name:48s} {config.train.batch_size:6d} {r['steps_per_sec']:9.2f} {r['images_per_sec']:9.1f}")

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    child = subprocess.run(
        [sys.executable, "-m", "benchmarks.train", "--sharded_only", "--steps", str(args.steps)],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )
    if child.returncode != 0:
        print(child.stderr[-2000:])
        raise SystemExit(child.returncode)
    out = json.loads(child.stdout.strip().splitlines()[-1])
    one, eight = out["1"]["steps_per_sec"], out["8"]["steps_per_sec"]
    print("\nsharded step, digits recipe, same global batch, 8 CPU devices vs 1 (same physical cores):")
    print(f"  1 device: {one:.2f} steps/s   8 devices: {eight:.2f} steps/s   time ratio 8/1: {one / eight:.2f}")


if __name__ == "__main__":
    main()
