"""Throughput and size of the difflax models, and of diffusers' ``UNet2DModel`` for comparison.

Run from the repository root::

    python -m benchmarks.models                  # defaults: 32x32x3 images, batch 8, ~2-3 minutes on 2 cores
    python benchmarks/models.py --dit S/2,B/2 --iters 5 --batch 16

For each model the forward pass (``apply``) and a training step's forward + backward
(``value_and_grad`` of a mean-squared loss) are compiled ahead of time, run ``--warmup`` times, then timed
over ``--iters`` calls with ``block_until_ready``; the median time gives images per second.
The U-Net is also built as diffusers' ``UNet2DModel`` of the same width, depth, attention
placement and scale-shift conditioning, timed the same way on CPU torch; its figures are
printed beside ours with the ratio difflax / diffusers. torch and diffusers are imported
only then; without them that part is skipped with a note (``pip install torch diffusers``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from difflax.models import UNet, dit

# Width and depth shared by our U-Net and the diffusers one it is compared with.
UNET_SMALL = dict(
    base_channels=64,
    channel_mult=(1, 2, 2),
    num_res_blocks=2,
    attention_resolutions=(16,),
    head_channels=32,
    dropout=0.0,
    resblock_updown=False,
    norm_groups=32,
)


def _median_seconds(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_flax(model, x, y, warmup: int, iters: int) -> dict:
    """Parameter count and forward / forward+backward images per second of a difflax model."""
    t = jnp.linspace(1.0, 999.0, x.shape[0])
    # init runs once: without XLA's backend optimizations it compiles several times faster.
    init = jax.jit(model.init, compiler_options={"xla_backend_optimization_level": 0})
    params = init(jax.random.key(0), x, t, y)["params"]
    n_params = sum(leaf.size for leaf in jax.tree.leaves(params))
    target = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)

    def train(p, x, t):
        loss = lambda q: jnp.mean((model.apply({"params": q}, x, t, y)[..., : x.shape[-1]] - target) ** 2)
        return jax.value_and_grad(loss)(p)

    # Compiled ahead of time, so no timed call includes compilation.
    forward = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, y)).lower(params, x, t).compile()
    train = jax.jit(train).lower(params, x, t).compile()
    fwd = _median_seconds(lambda: forward(params, x, t).block_until_ready(), warmup, iters)
    bwd = _median_seconds(lambda: jax.block_until_ready(train(params, x, t)), warmup, iters)
    return dict(params=n_params, fwd=x.shape[0] / fwd, train=x.shape[0] / bwd)


def bench_diffusers(image_size: int, channels: int, batch: int, warmup: int, iters: int) -> dict | str:
    """The same figures for diffusers' ``UNet2DModel`` with the width and depth of ``UNET_SMALL``."""
    try:
        import torch
        from diffusers import UNet2DModel
    except ImportError as err:
        return f"skipped: {err.name} is not installed (pip install torch diffusers)"

    levels = len(UNET_SMALL["channel_mult"])
    widths = tuple(UNET_SMALL["base_channels"] * m for m in UNET_SMALL["channel_mult"])
    attn = [image_size // 2**level in UNET_SMALL["attention_resolutions"] for level in range(levels)]
    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=widths,
        layers_per_block=UNET_SMALL["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=UNET_SMALL["head_channels"],
        norm_num_groups=UNET_SMALL["norm_groups"],
        resnet_time_scale_shift="scale_shift",
        dropout=0.0,
    )
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.randn(batch, channels, image_size, image_size)
    t = torch.linspace(1.0, 999.0, batch)
    target = torch.randn_like(x)

    def forward():
        with torch.no_grad():
            model(x, t)

    def train():
        model.zero_grad(set_to_none=True)
        loss = torch.mean((model(x, t).sample - target) ** 2)
        loss.backward()

    fwd = _median_seconds(forward, warmup, iters)
    bwd = _median_seconds(train, warmup, iters)
    return dict(params=n_params, fwd=batch / fwd, train=batch / bwd, threads=torch.get_num_threads())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--warmup", type=int, default=0, help="untimed calls after compilation (the median already drops a slow first)"
    )
    parser.add_argument("--iters", type=int, default=3, help="timed calls (median reported)")
    parser.add_argument("--dit", default="S/4,B/4", help="comma-separated DiT configs, e.g. S/2,B/4 ('' for none)")
    parser.add_argument("--num-classes", type=int, default=1000, help="DiT classes (0: unconditional)")
    parser.add_argument("--no-diffusers", action="store_true", help="skip the diffusers comparison")
    args = parser.parse_args(argv)

    shape = (args.batch, args.image_size, args.image_size, args.channels)
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
    num_classes = args.num_classes or None
    y = jnp.arange(args.batch) % num_classes if num_classes else None
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; images {shape[1:]}, batch {args.batch}, float32")

    rows = [("difflax UNet (small)", bench_flax(UNet(**UNET_SMALL), x, None, args.warmup, args.iters))]
    for name in filter(None, args.dit.split(",")):
        model = dit(name, num_classes=num_classes, learn_sigma=True)
        rows.append((f"difflax DiT-{name}", bench_flax(model, x, y, args.warmup, args.iters)))
    note = "skipped (--no-diffusers)"
    if not args.no_diffusers:
        result = bench_diffusers(args.image_size, args.channels, args.batch, args.warmup, args.iters)
        if isinstance(result, dict):
            rows.append((f"diffusers UNet2DModel (torch, {result['threads']} threads)", result))
            ours = rows[0][1]
            ratio = {k: ours[k] / result[k] for k in ("params", "fwd", "train")}
            rows.append(("ratio difflax / diffusers U-Net", ratio))
            note = None
        else:
            note = result

    print(f"{'model':<46} {'params':>12} {'fwd img/s':>11} {'fwd+bwd img/s':>14}")
    for name, r in rows:
        params = f"{r['params']:.3f}x" if name.startswith("ratio") else f"{r['params'] / 1e6:.2f}M"
        scale = "x" if name.startswith("ratio") else ""
        print(f"{name:<46} {params:>12} {r['fwd']:>10.2f}{scale or ' '} {r['train']:>13.2f}{scale or ' '}")
    if note:
        print(f"diffusers comparison {note}")


if __name__ == "__main__":
    main()
