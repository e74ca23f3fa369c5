"""Throughput accounting of a training step: images/s, model FLOPs, TFLOP/s per device and MFU.

Convention: the FLOPs of a step are those XLA's cost analysis counts for the whole jitted train
step *before* it is partitioned over devices (forward, backward, optimizer and EMA update of the
global batch; a multiply-add counts 2), so they do not depend on the mesh; a forward pass
recomputed under ``jax.checkpoint`` is counted again (the utilization is then of hardware FLOPs).
``TFLOP/s per device = FLOPs per step x steps/s / devices``; the model FLOPs
utilization (MFU, Chowdhery et al. 2022, "PaLM", appendix B) divides it by the device's peak dense
bfloat16 TFLOP/s from :data:`PEAK_TFLOPS` (also for a float32 run: the peak the hardware offers).
A device kind not in the table (every CPU) has no MFU: "unknown".
"""

from __future__ import annotations

__all__ = ["PEAK_TFLOPS", "peak_tflops", "step_flops", "throughput"]

# Peak dense bfloat16 TFLOP/s per device (per chip for TPUs), from the vendors' data sheets, keyed by
# a prefix of jax.Device.device_kind; the longest matching prefix wins.
PEAK_TFLOPS = {
    "TPU v2": 45.0,
    "TPU v3": 123.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,  # v5e
    "TPU v5": 459.0,  # v5p
    "TPU v6 lite": 918.0,  # v6e (Trillium)
    "NVIDIA A100": 312.0,
    "NVIDIA A10G": 70.0,  # 70 of its 140 sparse
    "NVIDIA L4": 121.0,
    "NVIDIA H100": 989.0,  # SXM; PCIe and NVL cards are lower
    "NVIDIA H200": 989.0,
    "NVIDIA B200": 2250.0,
    "Tesla V100": 125.0,  # float16 tensor cores (no bfloat16)
}


def peak_tflops(device_kind: str) -> float | None:
    """The peak dense bfloat16 TFLOP/s of a device kind (:data:`PEAK_TFLOPS`), or None when unknown."""
    matches = [prefix for prefix in PEAK_TFLOPS if device_kind.startswith(prefix)]
    return PEAK_TFLOPS[max(matches, key=len)] if matches else None


def step_flops(lowered) -> float | None:
    """FLOPs of a lowered jitted function (``jax.jit(f).lower(*args)``) by XLA's cost analysis, or None
    when the backend reports none. Nothing is compiled."""
    analysis = lowered.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
        analysis = analysis[0] if analysis else None
    flops = None if not analysis else analysis.get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def throughput(steps_per_sec: float, batch_size: int, flops: float | None, devices: int,
               peak: float | None) -> dict[str, float]:
    """``images_per_sec`` and, where ``flops`` is known, ``tflops_per_device`` and (with a known ``peak``) ``mfu``."""
    values = {"images_per_sec": steps_per_sec * batch_size}
    if flops is not None:
        values["tflops_per_device"] = flops * steps_per_sec / devices / 1e12
        if peak is not None:
            values["mfu"] = values["tflops_per_device"] / peak
    return values
