"""Convert pytorch-fid's FID Inception weights into the ``.npz`` that difflax loads.

difflax never downloads anything. To compute FID with the standard network, fetch the
weights once yourself (pytorch-fid's release asset, a port of TensorFlow's
``inception-2015-12-05`` graph):

    wget https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

then convert them (needs ``torch``, CPU is enough):

    python scripts/convert_inception.py pt_inception-2015-12-05-6726825d.pth fid_inception.npz

and use them:

    from difflax.metrics import inception
    variables = inception.load_inception("fid_inception.npz")
    features = inception.inception_feature_fn(variables)   # images NHWC in [-1, 1] -> (N, 2048)

The ``.npz`` layout (flat ``params/...`` and ``batch_stats/...`` keys, kernels in Flax's
HWIO order) is documented in :func:`difflax.metrics.inception.convert_torch_state_dict`.
The script checks the result against the Flax module (every array present, every shape
right) and prints the SHA-256 of the input so runs can be compared with the published
checksum prefix ``6726825d``. Not run in CI.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from difflax.metrics.inception import convert_torch_state_dict, load_inception


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """Read a ``.pth`` state dict with torch (on CPU) as name -> float32 numpy arrays."""
    try:
        import torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit("converting a .pth file needs torch: pip install torch (the CPU wheel is enough)") from err
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pth", help="pytorch-fid weights, e.g. pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("npz", help="output .npz for difflax.metrics.inception.load_inception")
    args = parser.parse_args(argv)

    digest = sha256(args.pth)
    print(f"sha256({args.pth}) = {digest}")
    if not digest.startswith("6726825d"):
        print("warning: this is not pytorch-fid's pt_inception-2015-12-05-6726825d.pth; FIDs will not be standard.")
    flat = convert_torch_state_dict(load_torch_state_dict(args.pth))
    np.savez(args.npz, **flat)
    variables = load_inception(args.npz, logits=True)  # raises if any array is missing or misshapen
    n = sum(int(np.prod(v.shape)) for k, v in flat.items() if k.startswith("params/"))
    print(f"wrote {args.npz}: {len(flat)} arrays, {n:,} parameters (with fc), collections {sorted(variables)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
