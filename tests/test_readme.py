"""The README's "API in ten lines" runs as printed and does what its comments say."""

from pathlib import Path

import jax.numpy as jnp


def _block(heading: str) -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return readme.split(heading)[1].split("```python")[1].split("```")[0]


def test_api_in_ten_lines():
    namespace = {}
    exec(compile(_block("## The API in ten lines"), "README API", "exec"), namespace)
    info, x0 = namespace["info"], namespace["x0"]
    assert int(info["nfe"]) == 10  # "10 denoiser evaluations"
    assert float(jnp.mean(x0[:, 0] < 0)) == 1.0  # "all samples in class 0"
