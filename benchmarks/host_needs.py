"""What a host needs to feed each recipe (configs/gpu8.py, configs/tpu_pod.py), computed from
the project's measured input figures; docs/hardware.md's table is `markdown()`'s output, and
tests/training/test_recipes.py keeps the two equal.

  python benchmarks/host_needs.py

The accelerators' images/s are ASSUMED, not measured: no GPU or TPU has run the training step
yet (benchmarks/RESULTS.md §7). Each is the project's target, 35% of the chip's dense bfloat16
peak (`alexnet_jax.model.backend.PEAK_FLOPS`) over the paper net's 4.35 GFLOP per trained
image. Everything else scales linearly with that rate: at half the rate, half the cores.
"""

import dataclasses
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alexnet_jax.model import backend
from alexnet_jax.model.alexnet import AlexNet
from alexnet_jax.studies.benchmark import train_flops_per_image

# Training images/s of one CPU core (one thread), the real training pipeline at batch 256:
# benchmarks/RESULTS.md §8, `python benchmarks/input_pipeline.py`, dev CPU, 2026-11-29.
RAW_PER_CORE = 10_463
JPEG_PER_CORE = 917
# ImageNet 2012 (ILSVRC-2012-CLS).
TRAIN_IMAGES, VAL_IMAGES = 1_281_167, 50_000
RAW_BYTES = 256 * 256 * 3 + 4  # an image of the raw shards, uint8, and its int32 label
# The JPEG shards' size as docs/data.md states it (about 30 GB for train and val), per image:
# an estimate, not measured on ImageNet here (`du -sb DATA_DIR` after `prepare` measures it).
JPEG_BYTES = round(30e9 / (TRAIN_IMAGES + VAL_IMAGES))
MFU = 0.35  # the project's target (docs/speed.md), assumed for every accelerator


@dataclasses.dataclass(frozen=True)
class Setup:
  name: str
  device_kind: str  # as JAX names it, for backend.peak_flops
  chips_per_host: int


SETUPS = (
  Setup("configs/gpu8.py: 8x H100 SXM, one host", "H100", chips_per_host=8),
  # Cloud TPU v5e: multi-host slices are made of 4-chip VMs (GKE's ct5lp-hightpu-4t; the
  # 8-chip VM is single-host only), so a 4x8 slice is 32 chips on 8 hosts.
  Setup("configs/tpu_pod.py: TPU v5e-32, per host", "TPU v5 lite", chips_per_host=4),
)


@dataclasses.dataclass(frozen=True)
class Needs:
  """What one host of a setup needs; cores are CPU cores (vCPUs) for the input alone."""

  setup: Setup
  per_chip: float  # assumed training images/s of one accelerator
  per_host: float
  raw_cores: int
  jpeg_cores: int
  raw_read_gbps: float  # GB/s read from disk when the shards are not in the page cache
  jpeg_read_gbps: float


def chip_rate(device_kind: str) -> float:
  """Assumed training images/s of one accelerator: MFU x its bfloat16 peak / FLOP per image."""
  peak = backend.peak_flops(device_kind, "bfloat16")
  return MFU * peak / train_flops_per_image(AlexNet(variant="paper"), 227)


def needs(setup: Setup) -> Needs:
  per_chip = chip_rate(setup.device_kind)
  per_host = per_chip * setup.chips_per_host
  return Needs(
    setup,
    per_chip,
    per_host,
    raw_cores=math.ceil(per_host / RAW_PER_CORE),
    jpeg_cores=math.ceil(per_host / JPEG_PER_CORE),
    raw_read_gbps=per_host * RAW_BYTES / 1e9,
    jpeg_read_gbps=per_host * JPEG_BYTES / 1e9,
  )


def disk_gb(bytes_per_image: int) -> tuple[float, float]:
  """(train, val) GB of shards at `bytes_per_image`."""
  return TRAIN_IMAGES * bytes_per_image / 1e9, VAL_IMAGES * bytes_per_image / 1e9


def markdown() -> str:
  """The two tables of docs/hardware.md: input per host, then disk and page cache."""
  lines = [
    "| setup | chips per host | assumed images/s per chip | per host | input cores, raw shards "
    "| input cores, JPEG shards | disk reads uncached, raw (GB/s) | uncached, JPEG (GB/s) |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for n in map(needs, SETUPS):
    lines.append(
      f"| {n.setup.name} | {n.setup.chips_per_host} | {n.per_chip:,.0f} | {n.per_host:,.0f} "
      f"| {n.raw_cores} | {n.jpeg_cores} | {n.raw_read_gbps:.1f} | {n.jpeg_read_gbps:.1f} |"
    )
  lines += [
    "",
    "| shards | bytes per image | train (GB) | val (GB) | disk and page cache per host (GB) |",
    "|---|---|---|---|---|",
  ]
  for name, size in (("raw (`--format=raw`)", RAW_BYTES), ("JPEG 256x256", JPEG_BYTES)):
    train, val = disk_gb(size)
    lines.append(f"| {name} | {size:,} | {train:.1f} | {val:.1f} | {train + val:.1f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  print(markdown())
