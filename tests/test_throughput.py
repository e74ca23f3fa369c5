"""Throughput accounting (difflax.train.throughput): the FLOP convention, the peak table and the arithmetic."""

import jax
import jax.numpy as jnp
import pytest

from difflax.train.throughput import peak_tflops, step_flops, throughput


def test_flops_are_xla_cost_analysis_of_the_unpartitioned_program():
    """A matmul (m, k) x (k, n) is 2 m k n FLOPs (a multiply-add counts 2); its gradient adds two more matmuls."""
    a, b = jnp.ones((8, 16)), jnp.ones((16, 4))
    assert step_flops(jax.jit(lambda a, b: a @ b).lower(a, b)) == 2 * 8 * 16 * 4
    grad = jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(jnp.square(a @ b)), argnums=(0, 1)))
    assert 3 * 2 * 8 * 16 * 4 <= step_flops(grad.lower(a, b)) < 3.2 * 2 * 8 * 16 * 4  # forward, a matmul per gradient


def test_peak_table_takes_the_longest_prefix_and_knows_no_cpu():
    assert peak_tflops("TPU v5 lite") == 197.0 and peak_tflops("TPU v5p") == 459.0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("cpu") is None


def test_throughput_per_device_and_mfu():
    values = throughput(steps_per_sec=2.0, batch_size=256, flops=3e14, devices=4, peak=275.0)
    assert values["images_per_sec"] == 512.0
    assert values["tflops_per_device"] == pytest.approx(150.0) and values["mfu"] == pytest.approx(150.0 / 275.0)
    assert throughput(2.0, 256, 3e14, 4, None).keys() == {"images_per_sec", "tflops_per_device"}
    assert throughput(2.0, 256, None, 4, 275.0) == {"images_per_sec": 512.0}


def test_throughput_benchmark_runs_on_cpu_at_a_tiny_size(tmp_path):
    """benchmarks.throughput, the script a GPU or TPU runs unchanged: one DiT-S block, batch 2, one timed step."""
    import json

    from benchmarks.throughput import main

    (row,) = main(["--models", "dit-s", "--batch", "2", "--steps", "1", "--depth", "1", "--out", str(tmp_path)])
    assert row["flops_per_step"] > 3 * 2 * 2 * 256 * 384 * 384 * 4  # fwd + bwd of one block's MLP, 256 tokens
    assert row["images_per_sec_per_device"] == pytest.approx(2 / row["step_seconds"] / row["devices"])
    per_device = row["flops_per_step"] / row["step_seconds"] / row["devices"]
    assert row["tflops_per_device"] == pytest.approx(per_device / 1e12)
    assert row["mfu"] is None  # no CPU has a peak in the table
    assert json.loads((tmp_path / "throughput.json").read_text())["rows"][0]["model"] == "dit-s"
