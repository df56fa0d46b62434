"""What the backend this process runs on can do, and how to compile the net's steps for it.

- `compiler_options()`: options for every `jax.jit` of a step and of extraction. XLA:CPU
  hands convolutions, dots and reductions to YNNPACK by default (jaxlib 0.10 to 0.12); its
  Eigen convolutions are faster for every AlexNet layer (the strided 11x11 conv1 and the
  weight gradients most), so on the CPU the convolutions stay out of YNNPACK while dots and
  reductions keep it ("eigen_conv"). Measured on the paper net's float32 train step, batch 32,
  against XLA's defaults: 1.6x on an AVX-512 CPU (jax 0.10.2), 1.8x (jax 0.10.2) and 1.4x
  (jax 0.12.1) on an AVX2 one; against nothing in YNNPACK, 1.06-1.09x (evaluation at batch
  128 equal within 3%). An XLA that does not know the option gets none (its defaults), never
  an error.
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

_YNN = "xla_cpu_experimental_ynn_fusion_type"  # what XLA:CPU hands to YNNPACK
_DOT, _REDUCE = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT", "LIBRARY_FUSION_TYPE_REDUCE"
_FUSED_DOT, _ELTWISE = "LIBRARY_FUSION_TYPE_DOT", "LIBRARY_FUSION_TYPE_ELTWISE"

# The XLA:CPU option sets `python -m alexnet_jax.bench --compiler_options=NAME,...` compares.
# compiler_options() gives the measured best for the train and evaluation steps and extraction
# (docs/speed.md has the figures); tests/model/test_ops.py checks that every set computes what
# XLA's defaults compute.
CPU_OPTION_SETS: dict[str, dict[str, Any]] = {
  "xla": {},  # XLA's defaults: convolutions, dots and reductions in YNNPACK
  "eigen_conv": {_YNN: f"{_DOT},{_REDUCE}"},  # convolutions on Eigen; dots, reductions in YNNPACK
  "no_ynnpack": {_YNN: ""},  # nothing in YNNPACK
  # eigen_conv and more: YNNPACK's elementwise fusions, its dots fused with their neighbours,
  # oneDNN where XLA:CPU offers it.
  "eigen_conv_eltwise": {_YNN: f"{_DOT},{_REDUCE},{_ELTWISE}"},
  "eigen_conv_fused_dot": {_YNN: f"{_FUSED_DOT},{_DOT},{_REDUCE}"},
  "eigen_conv_onednn": {_YNN: f"{_DOT},{_REDUCE}", "xla_cpu_use_onednn": True},
}
CPU_CHOICE = "eigen_conv"

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
def _known(name: str) -> tuple[tuple[str, Any], ...]:
  """The CPU option set `name`, or none where this XLA does not know its options."""
  options = CPU_OPTION_SETS[name]
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(jnp.float32(0)).compile()
  except jax.errors.JaxRuntimeError:  # an XLA without the option: keep its defaults
    return ()
  return tuple(options.items())


def cpu_option_set(name: str) -> dict[str, Any]:
  """The XLA:CPU options of CPU_OPTION_SETS[name] this XLA knows ({} if it knows none)."""
  if name not in CPU_OPTION_SETS:
    raise ValueError(
      f"unknown compiler option set {name!r}: use one of {', '.join(CPU_OPTION_SETS)}"
    )
  return dict(_known(name))


def compiler_options(platform: str | None = None, cpu_set: str = "auto") -> dict[str, Any]:
  """`jax.jit(..., compiler_options=compiler_options())` for the default (or named) platform:
  on the CPU the set `cpu_set` of CPU_OPTION_SETS ("auto": CPU_CHOICE, the measured best),
  elsewhere XLA's defaults."""
  name = CPU_CHOICE if cpu_set == "auto" else cpu_set
  options = cpu_option_set(name)  # an unknown name fails on every platform
  return options if (platform or jax.default_backend()) == "cpu" else {}


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
