"""Converted checkpoints, side by side: difflax (JAX) against diffusers (torch) on the same weights.

Builds randomly initialised diffusers models of published layouts, saves them with ``save_pretrained``
(safetensors) into a temporary folder, converts them with :mod:`difflax.hub`, and times on this CPU:

* the DiT forward pass (``DiTTransformer2DModel`` of DiT-S/2's width and depth, 1000 classes, learned
  sigma, 32x32x4 latents; ``--dit-layers`` to change the depth), batch ``--batch``;
* the VAE decoder of the Stable Diffusion layout (``AutoencoderKL`` with the SD VAE's widths), latents of
  ``--latent-size`` squared, batch 1.

Both sides are single-threaded (``XLA_FLAGS`` below unless set; ``torch.set_num_threads(1)``), run
``--warmup`` times, then timed ``--repeats`` times interleaved; medians. Prints the times, the
ratio diffusers / difflax (above 1: difflax is faster) and the relative L2 difference of the outputs.

    python -m benchmarks.converted [--batch 4] [--dit-layers 12] [--latent-size 16] [--repeats 7]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import argparse
import statistics
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.models import _median_seconds
from difflax.hub import convert_autoencoder_kl, convert_dit


def compare(name, jax_fn, torch_fn, args):
    """Interleaved repeats of both; returns a result row."""
    jax_out, torch_out = np.asarray(jax_fn()), np.asarray(torch_fn())
    rel = float(np.linalg.norm(jax_out - torch_out) / np.linalg.norm(torch_out))
    for _ in range(args.warmup):
        jax_fn(), torch_fn()
    times = [(_median_seconds(jax_fn, 0, 1), _median_seconds(torch_fn, 0, 1)) for _ in range(args.repeats)]
    j, t = (statistics.median(side) for side in zip(*times, strict=True))
    print(f"{name:36s} difflax {j * 1e3:9.1f} ms   diffusers {t * 1e3:9.1f} ms   ratio {t / j:5.2f}x   "
          f"rel. L2 {rel:.1e}", flush=True)
    return {"model": name, "difflax_ms": j * 1e3, "diffusers_ms": t * 1e3, "ratio": t / j, "rel_l2": rel}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dit-layers", type=int, default=12)
    parser.add_argument("--latent-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    import diffusers
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        # DiT-S/2: 6 heads of 64, 12 layers, patch 2, 32x32x4 latents, 1000 classes, learned sigma.
        dit_torch = diffusers.DiTTransformer2DModel(
            num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=args.dit_layers,
            sample_size=32, patch_size=2, num_embeds_ada_norm=1000).eval()
        dit_torch.save_pretrained(os.path.join(tmp, "dit"), safe_serialization=True)
        dit, params, info = convert_dit(os.path.join(tmp, "dit"))
        x = rng.standard_normal((args.batch, 32, 32, 4)).astype(np.float32)
        t = ((rng.integers(0, 1000, args.batch) + 1) / 1000).astype(np.float32)  # DDPM step n at t = (n + 1) / N
        y = rng.integers(0, 1000, args.batch)
        forward = jax.jit(lambda p, x, t, y: dit.apply({"params": p}, x, t, y))
        xj, tj, yj = jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)
        xt, yt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(y)
        tt = torch.from_numpy(np.array(info.process.timestep(t)))
        rows.append(compare(
            f"DiT-S/2 ({args.dit_layers} layers) forward, batch {args.batch}",
            lambda: forward(params, xj, tj, yj).block_until_ready(),
            lambda: dit_torch(xt, timestep=tt, class_labels=yt).sample.numpy().transpose(0, 2, 3, 1),
            args,
        ))
        # The Stable Diffusion VAE's layout: widths 128, 256, 512, 512, two blocks per level, 4 latent channels.
        vae_torch = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            latent_channels=4, norm_num_groups=32, sample_size=8 * args.latent_size).eval()
        vae_torch.save_pretrained(os.path.join(tmp, "vae"), safe_serialization=True)
        vae, vae_params, _ = convert_autoencoder_kl(os.path.join(tmp, "vae"))
        z = rng.standard_normal((1, args.latent_size, args.latent_size, 4)).astype(np.float32)
        decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))
        zj, zt = jnp.asarray(z), torch.from_numpy(z.transpose(0, 3, 1, 2).copy())
        size = 8 * args.latent_size
        rows.append(compare(
            f"SD VAE decode {args.latent_size}^2 -> {size}^2, batch 1",
            lambda: decode(vae_params, zj).block_until_ready(),
            lambda: vae_torch.decode(zt).sample.numpy().transpose(0, 2, 3, 1),
            args,
        ))
    print(f"\njax {jax.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"XLA_FLAGS={os.environ['XLA_FLAGS']!r}, torch threads 1")
    return rows


if __name__ == "__main__":
    main()
