"""Training images/s fed by the real input pipeline, next to the same step on resident batches.

  python benchmarks/end_to_end.py [--batch_size=32] [--images=640] [--rounds=3] [--dtype=float32]

Photo-like 500x375 JPEGs are prepared into shards as `alexnet_jax.prepare` writes them for
ImageNet (256x256, JPEG); the pipeline side trains on `batches.train_batches` over
them (random 227 crops, flips, PCA colour noise, the per-pixel mean image), each batch put on
the devices as training puts it; the synthetic side is `alexnet_jax.bench`'s. Both run the
same jitted train step, alternating in every round, in one process: on a CPU the tf.data
threads and XLA share the cores, which is what the end-to-end figure is about.

Then, per storage format (raw shards, `prepare --format=raw`, and JPEG shards), the fraction
of step time spent waiting for input when the step is made fast: the on-device half of the
augmentation alone (`augment.normalize`: mean image, colour, flip) with no net, so that on
a CPU too the input is the bottleneck, as it would be for the real step on an accelerator.
The loop is training's: batches put on the devices as training puts them, two ahead.
The last line is JSON.
"""

import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # input_pipeline.py beside it
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the package

import jax
from absl import flags
from input_pipeline import make_folder

from alexnet_jax.core import cli
from alexnet_jax.data import augment, prepare_shards, sources
from alexnet_jax.data.batches import train_batches
from alexnet_jax.data.stats import load_stats
from alexnet_jax.model import sharding
from alexnet_jax.studies import benchmark
from alexnet_jax.training import train


def define_flags() -> None:
  flags.DEFINE_integer("batch_size", 32, "Global batch size.")
  flags.DEFINE_integer("images", 640, "Training images to prepare.")
  flags.DEFINE_integer("rounds", 3, "Alternating timing rounds.")
  flags.DEFINE_float("round_seconds", 5.0, "Seconds per side per round.")
  flags.DEFINE_string("dtype", "float32", "Computation dtype: float32 or bfloat16.")
  flags.DEFINE_string("mesh", "none", "'none' (no mesh) or DATAxMODEL, e.g. 1x2.")
  flags.DEFINE_integer("fast_batch_size", 256, "Batch of the input-bound loop.")
  flags.DEFINE_integer("fast_steps", 40, "Steps of the input-bound loop, per format.")


def input_wait(batches, mean_image, steps: int) -> dict:
  """Training's loop around a step that only normalizes its batch: the fraction of the wall
  time spent in next() (making the batch or waiting for it), and images/s."""
  mesh = sharding.make_mesh(1, jax.devices()[:1])
  step = jax.jit(lambda b, m: augment.normalize(b, m).sum())
  mean = jax.device_put(mean_image)
  stream = train.prefetch(train.to_global(b, sharding.batch_sharding(mesh)) for b in batches)
  jax.block_until_ready(step(next(stream), mean))  # compiled, pipeline warm
  waited, start, out = 0.0, time.perf_counter(), None
  for _ in range(steps):
    t = time.perf_counter()
    batch = next(stream)
    waited += time.perf_counter() - t
    out = step(batch, mean)
  jax.block_until_ready(out)
  total = time.perf_counter() - start
  size = batch["image"].shape[0]
  return {
    "wait_fraction": round(waited / total, 3),
    "images_per_sec": round(steps * size / total, 1),
  }


def main() -> None:
  cli.simulate_cpu_devices(2)  # before JAX starts its backend: --mesh=1x2 on a CPU host
  args = flags.FLAGS
  case = benchmark.Case(args.mesh, args.dtype, args.batch_size)
  with tempfile.TemporaryDirectory() as tmp:
    make_folder(os.path.join(tmp, "raw"), args.images)
    prepare_shards.prepare(os.path.join(tmp, "raw"), os.path.join(tmp, "out"), stats_images=100)
    train = sources.read_prepared(os.path.join(tmp, "out")).train
    stats = load_stats(os.path.join(tmp, "out"), 256, (0, 0, 0))
    batches = train_batches(
      train, batch_size=args.batch_size, image_size=227, resize_size=256, stats=stats, seed=0
    )
    runners = {
      "synthetic": benchmark.build(case, "paper", 227).train,
      "input pipeline": benchmark.build(
        case, "paper", 227, batches=batches, mean_image=stats.mean_image
      ).train,
    }
    counts = {k: benchmark.steps_for(r, args.round_seconds) for k, r in runners.items()}
    times = benchmark.time_rounds(runners, counts, args.rounds)
    fast = dict(batch_size=args.fast_batch_size, image_size=227, resize_size=256, stats=stats)
    formats = {"jpeg": train_batches(train, seed=1, **fast)}
    prepare_shards.to_raw(os.path.join(tmp, "out"))
    raw = sources.read_prepared(os.path.join(tmp, "out")).train
    formats["raw"] = train_batches(raw, seed=1, **fast)
    waits = {k: input_wait(b, stats.mean_image, args.fast_steps) for k, b in formats.items()}
  rows = {k: round(args.batch_size / statistics.median(t), 2) for k, t in times.items()}
  ratio = round(benchmark.median_ratio(times["synthetic"], times["input pipeline"]), 3)
  print(
    f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, paper net, batch {args.batch_size}, "
    f"{args.dtype}: synthetic {rows['synthetic']} images/s, "
    f"input pipeline {rows['input pipeline']} images/s ({ratio}x)"
  )
  for name, w in waits.items():
    print(
      f"{name} shards, step = normalize only, batch {args.fast_batch_size}: "
      f"{100 * w['wait_fraction']:.1f}% of step time waiting for input, "
      f"{w['images_per_sec']} images/s"
    )
  print(
    json.dumps(
      {
        "device": jax.devices()[0].device_kind,
        "cpus": os.cpu_count(),
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "mesh": args.mesh,
        "rounds": args.rounds,
        "synthetic_images_per_sec": rows["synthetic"],
        "pipeline_images_per_sec": rows["input pipeline"],
        "pipeline_over_synthetic": ratio,
        "input_bound": waits,
      }
    )
  )


if __name__ == "__main__":
  cli.run(main, define_flags)
