"""The platform attention kernels are built for: `compile_target` / `target_platform`.

Default: jax.default_backend(). `compile_target("tpu")` lets a CPU machine trace and
compile TPU programs (Mosaic kernels included) against devices from
`jax.experimental.topologies.get_topology_desc`.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax

PLATFORMS = ("tpu", "gpu", "cpu")

# ----------------------------------------------------------------------------
# Compile target: the platform kernels are built for (default: jax.default_backend()).
# ----------------------------------------------------------------------------

# A JAX config state (part of the jit cache / trace context key, so a function traced
# for one target is retraced for another); a plain context variable if that internal
# API is missing.
try:
  from jax._src import config as _jax_config  # pylint: disable=g-import-not-at-top
  _TARGET_STATE = _jax_config.optional_enum_state(
      name="pgm_jax_compile_target", enum_values=list(PLATFORMS), default=None,
      help="pgm_jax attention: platform the kernels are built for (compile_target).",
      include_in_jit_key=True, include_in_trace_context=True)
except Exception:  # pylint: disable=broad-except
  _TARGET_STATE = None
_TARGET_VAR = contextvars.ContextVar("pgm_jax_compile_target", default=None)


@contextlib.contextmanager
def compile_target(platform: str) -> Iterator[None]:
  """Builds attention for `platform` ("tpu" | "gpu" | "cpu") instead of the local backend.

  Inside the context `resolve_impl("auto")` resolves for `platform` and the Pallas
  kernels are lowered for it with interpret off ("tpu" -> Mosaic, "gpu" -> Triton);
  "cpu" gives the local CPU behaviour (auto -> xla, pallas interpreted). Trace (jit,
  lower) inside the context, e.g. to compile for TPU devices from
  `jax.experimental.topologies.get_topology_desc` on a CPU machine:
    with compile_target("tpu"): jax.jit(step).lower(...).compile()
  """
  if platform not in PLATFORMS:
    raise ValueError(f"compile_target platform must be one of {PLATFORMS}, got {platform!r}")
  if _TARGET_STATE is not None:
    with _TARGET_STATE(platform):
      yield
  else:
    token = _TARGET_VAR.set(platform)
    try:
      yield
    finally:
      _TARGET_VAR.reset(token)


def target_platform() -> str:
  """"tpu" | "gpu" | "cpu": the `compile_target` if set, else jax.default_backend()."""
  value = _TARGET_STATE.value if _TARGET_STATE is not None else _TARGET_VAR.get()
  return value or jax.default_backend()
