"""Peak FLOP/s per chip and the training throughput metrics derived from it (MFU).

    peak = peak_flops_per_chip(jax.devices()[0].device_kind, override=None)  # None: unknown
    mfu(model_flops_per_step, steps_per_s, peak, num_chips)

The table holds the dense bf16 peak of one chip (one `jax.Device`), matched on JAX's
`device_kind` string. Sources (checked 2025):
  * TPU v4 275e12, v5p ("TPU v5") 459e12, v5e ("TPU v5 lite") 197e12, v6e ("TPU v6 lite")
    918e12: the Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, v5p,
    v5e, v6e, "Peak compute per chip (bf16)").
  * NVIDIA H100 SXM 989e12, H100 PCIe 756e12, H200 989e12, A100 312e12: NVIDIA's
    datasheets, dense (without sparsity) BF16 Tensor Core.
A chip that is not in the table (CPU, an unlisted GPU) has no peak: MFU is left out
rather than reported as 0; `config.train.peak_flops_per_chip` overrides the table.
"""
from __future__ import annotations

import math
from typing import Optional

# (what device_kind must equal, lower-cased) -> dense bf16 FLOP/s of one chip.
TPU_PEAK_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5": 459e12,        # v5p
    "tpu v5p": 459e12,
    "tpu v5 lite": 197e12,   # v5e
    "tpu v5e": 197e12,
    "tpu v6 lite": 918e12,   # v6e (Trillium)
    "tpu v6e": 918e12,
}
# (substring of device_kind, lower-cased) -> dense bf16 FLOP/s; the first match wins, so
# the more specific names come first.
GPU_PEAK_FLOPS = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),        # SXM ("NVIDIA H100 80GB HBM3")
    ("h200", 989e12),
    ("a100", 312e12),
)


def peak_flops_per_chip(device_kind: str, override: Optional[float] = None) -> Optional[float]:
  """Dense bf16 FLOP/s of one chip of `device_kind` (`override` if given), None if unknown."""
  if override is not None:
    return float(override)
  kind = (device_kind or "").strip().lower()
  if kind in TPU_PEAK_FLOPS:
    return TPU_PEAK_FLOPS[kind]
  for name, peak in GPU_PEAK_FLOPS:
    if name in kind:
      return peak
  return None


def mfu(model_flops_per_step: float, steps_per_s: float, peak_per_chip: float,
        num_chips: int) -> float:
  """Model FLOPs utilisation: the analytic FLOPs achieved per second over the slice's peak."""
  return model_flops_per_step * steps_per_s / (peak_per_chip * num_chips)


def check_peak_override(value, key: str = "config.train.peak_flops_per_chip") -> None:
  """A one-line error for an override that is not a positive finite number (None is fine)."""
  if value is None:
    return
  try:
    ok = math.isfinite(float(value)) and float(value) > 0
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"{key}={value!r} must be a positive number of FLOP/s per chip (e.g. "
                     f"989e12), or None to look the device kind up")
