"""What the backend this process runs on can do, and how to compile the net's steps for it.

- `compiler_options()`: options for every `jax.jit` of a step. XLA:CPU hands convolutions to
  YNNPACK by default (jaxlib 0.10); for every AlexNet layer its Eigen convolutions are faster
  (the strided 11x11 conv1 and the weight gradients most: 1.6x on the whole train step), so
  on the CPU the convolutions stay out of YNNPACK while dots and reductions keep it. An XLA that
  does not know the option gets none (its defaults), never an error.
- `check_dtype(dtype)`: a clear error before anything big is compiled when the device cannot
  compute in that dtype.
- `peak_flops(device_kind, dtype)`: dense peak FLOP/s of known accelerators, for MFU.
- `default_ops_impl()`: "fast" (hand-written gradients, measured 1.2x on the CPU) on the
  CPU; XLA's "plain" ops on a GPU or TPU until a measurement there says otherwise.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

_CPU_OPTIONS = {
  "xla_cpu_experimental_ynn_fusion_type": (
    "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
  )
}

# Dense peak FLOP/s per chip by a substring of `device.device_kind`, first match wins.
# float32 on NVIDIA GPUs is the TF32 tensor-core peak: XLA computes float32 convolutions and
# dots in TF32 at JAX's default precision. TPUs list bfloat16 only.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
  ("H100 PCIe", {"bfloat16": 756e12, "float32": 378e12}),
  ("H100", {"bfloat16": 989e12, "float32": 495e12}),
  ("H200", {"bfloat16": 989e12, "float32": 495e12}),
  ("A100", {"bfloat16": 312e12, "float32": 156e12}),
  ("L4", {"bfloat16": 121e12, "float32": 60e12}),
  ("TPU v4", {"bfloat16": 275e12}),
  ("TPU v5 lite", {"bfloat16": 197e12}),
  ("TPU v5", {"bfloat16": 459e12}),
  ("TPU v6 lite", {"bfloat16": 918e12}),
)


@functools.cache
def _options_for(platform: str) -> tuple[tuple[str, Any], ...]:
  if platform != "cpu":
    return ()
  try:
    jax.jit(lambda x: x + 1, compiler_options=_CPU_OPTIONS).lower(jnp.float32(0)).compile()
  except jax.errors.JaxRuntimeError:  # an XLA without the option: keep its defaults
    return ()
  return tuple(_CPU_OPTIONS.items())


def compiler_options(platform: str | None = None) -> dict[str, Any]:
  """`jax.jit(..., compiler_options=compiler_options())` for the default (or named) platform."""
  return dict(_options_for(platform or jax.default_backend()))


def default_ops_impl(platform: str | None = None) -> str:
  """What `ops_impl="auto"` means on the default (or named) platform."""
  return "fast" if (platform or jax.default_backend()) == "cpu" else "plain"


def check_dtype(dtype: Any) -> None:
  """Raises ValueError naming the device if it cannot run a convolution and a dot in `dtype`."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return
  device = jax.devices()[0]

  def conv_then_dot(x, w):
    y = jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y.reshape(16, 16) @ y.reshape(16, 16)

  try:
    jax.block_until_ready(
      jax.jit(conv_then_dot)(jnp.ones((1, 8, 8, 3), dtype), jnp.ones((3, 3, 3, 4), dtype))
    )
  except Exception as e:  # backends fail in many ways (runtime, not implemented, ...): all mean no
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(
      f"{dtype.name} is not supported on {device.device_kind} ({device.platform}): {first}; "
      "use float32"
    ) from e


def peak_flops(device_kind: str, dtype: Any) -> float | None:
  """The device's dense peak FLOP/s in `dtype`, or None when this table does not know it."""
  name = jnp.dtype(dtype).name
  for key, peaks in PEAK_FLOPS:
    if key.lower() in device_kind.lower():
      return peaks.get(name)
  return None
