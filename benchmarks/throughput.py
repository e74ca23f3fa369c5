"""Training throughput on whatever accelerators are present: step time, images/s/device, TFLOP/s/device, MFU.

For DiT-S/2, B/2, L/2 and XL/2 (the latent ImageNet-256 recipe, ``difflax/configs/imagenet256_dit_latent.py``:
32x32x4 latents, 1000 classes, its FSDP mesh over every device) and the CIFAR-10 DDPM++ U-Net
(``difflax/configs/cifar10_ddpmpp.py``, 32x32x3), each at its recipe's global batch unless ``--batch``
says otherwise, the real :class:`~difflax.train.Trainer` step is timed on random data of the recipe's
shape: ``--steps`` steps after one warm-up (compile) step. FLOPs per step are XLA's cost analysis of the
unpartitioned step and MFU is against the device's peak dense bfloat16 TFLOP/s
(:mod:`difflax.train.throughput`; "unknown" on a CPU). ``--dtype bfloat16`` sets the models' compute
dtype (parameters and optimizer state stay float32).

    python -m benchmarks.throughput [--models dit-s,dit-b,dit-l,dit-xl,unet-cifar] [--batch N] [--steps 10]
    python -m benchmarks.throughput --models dit-s --batch 2 --steps 1 --depth 1   # the test suite's CPU check

Prints a markdown table and writes ``throughput.json`` into ``--out`` (default ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os

import jax
import numpy as np

from benchmarks import train as train_benchmark
from difflax.data import ArrayDataset
from difflax.train.throughput import peak_tflops, throughput

MODELS = {  # name: (recipe, DiT size or None, example shape, classes)
    "dit-s": ("imagenet256_dit_latent", "S/2", (32, 32, 4), 1000),
    "dit-b": ("imagenet256_dit_latent", "B/2", (32, 32, 4), 1000),
    "dit-l": ("imagenet256_dit_latent", "L/2", (32, 32, 4), 1000),
    "dit-xl": ("imagenet256_dit_latent", "XL/2", (32, 32, 4), 1000),
    "unet-cifar": ("cifar10_ddpmpp", None, (32, 32, 3), 10),
}


def recipe(name: str, batch: int | None, dtype: str, depth: int | None = None):
    module, size, shape, classes = MODELS[name]
    config = importlib.import_module(f"difflax.configs.{module}").get_config()
    if size is not None:
        config.model.kwargs.size = size
        if depth is not None:
            config.model.kwargs.depth = depth
    config.model.kwargs.dtype = dtype
    if batch is not None:
        config.train.batch_size = batch
    config.data.image_size = shape[0]
    config.train.async_checkpoint = False
    rng = np.random.default_rng(0)
    records = max(config.train.batch_size, 2)
    labels = rng.integers(0, classes, records)
    labels[0] = classes - 1  # the dataset's classes are 0 .. max label
    data = ArrayDataset(rng.standard_normal((records, *shape)).astype(np.float32), labels)
    return config, data


def measure(name: str, batch: int | None, steps: int, dtype: str, depth: int | None = None) -> dict:
    config, data = recipe(name, batch, dtype, depth)
    r = train_benchmark.measure(config, steps, dataset=data)
    devices = int(np.prod(list(r["mesh"].values())))
    values = throughput(r["steps_per_sec"], config.train.batch_size, r["flops_per_step"], devices,
                        peak_tflops(jax.devices()[0].device_kind))
    return {"model": name, "params": r["params"], "batch": config.train.batch_size, "devices": devices,
            "mesh": r["mesh"], "step_seconds": 1.0 / r["steps_per_sec"], "flops_per_step": r["flops_per_step"],
            "images_per_sec_per_device": values["images_per_sec"] / devices,
            "tflops_per_device": values.get("tflops_per_device"), "mfu": values.get("mfu")}


def markdown(rows, device_kind: str) -> list[str]:
    lines = [f"Device: {device_kind} x {rows[0]['devices'] if rows else 0}", "",
             "| model | params | global batch | mesh | step s | images/s/device | TFLOP/s/device | MFU |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tflops = "n/a" if r["tflops_per_device"] is None else f"{r['tflops_per_device']:.3g}"
        mfu = "unknown" if r["mfu"] is None else f"{r['mfu']:.1%}"
        mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {mesh} | {r['step_seconds']:.3g} | "
                     f"{r['images_per_sec_per_device']:.3g} | {tflops} | {mfu} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: each recipe's)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps after the warm-up step")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--depth", type=int, default=None, help="DiT blocks (default: the size's; for a quick check)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; known: {', '.join(MODELS)}")
    rows = []
    for name in names:
        rows.append(measure(name, args.batch, args.steps, args.dtype, args.depth))
        print(f"{name}: {rows[-1]}", flush=True)
    kind = jax.devices()[0].device_kind
    lines = markdown(rows, kind)
    print("\n".join(lines))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "throughput.json"), "w") as f:
        json.dump({"device_kind": kind, "dtype": args.dtype, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
