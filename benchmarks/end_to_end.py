"""Training images/s fed by the real input pipeline, next to the same step on a device-resident batch.

  python benchmarks/end_to_end.py [--batch_size=32] [--images=640] [--rounds=3] [--dtype=float32]

Photo-like 500x375 JPEGs are prepared into shards as `alexnet_jax.prepare` writes them for
ImageNet (256x256, JPEG); the pipeline side trains on `input_pipeline.train_batches` over
them (random 227 crops, flips, PCA colour noise, the per-pixel mean image), each batch put on
the devices as training puts it; the synthetic side is `alexnet_jax.bench`'s. Both run the
same jitted train step, alternating in every round, in one process: on a CPU the tf.data
threads and XLA share the cores, which is what the end-to-end figure is about.
The last line is JSON.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import argparse
import json
import statistics
import tempfile

import jax
from input_pipeline import make_folder

from alexnet_jax import (
  bench,  # first: sets the simulated CPU devices before JAX starts
  prepare,
)
from alexnet_jax import input_pipeline as ip


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--images", type=int, default=640, help="training images to prepare")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--round_seconds", type=float, default=5.0)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--mesh", default="none")
  args = parser.parse_args()
  case = bench.Case(args.mesh, args.dtype, args.batch_size)
  with tempfile.TemporaryDirectory() as tmp:
    make_folder(os.path.join(tmp, "raw"), args.images)
    prepare.prepare(os.path.join(tmp, "raw"), os.path.join(tmp, "out"), stats_images=100)
    train, _ = ip.read_prepared(os.path.join(tmp, "out"))
    stats = ip.load_stats(os.path.join(tmp, "out"), 256, (0, 0, 0))
    batches = ip.train_batches(
      train, batch_size=args.batch_size, image_size=227, resize_size=256, stats=stats, seed=0
    )
    runners = {
      "synthetic": bench.build(case, "paper", 227).train,
      "input pipeline": bench.build(
        case, "paper", 227, batches=batches, mean_image=stats.mean_image
      ).train,
    }
    counts = {k: bench.steps_for(r, args.round_seconds) for k, r in runners.items()}
    times = bench.time_rounds(runners, counts, args.rounds)
  rows = {k: round(args.batch_size / statistics.median(t), 2) for k, t in times.items()}
  ratio = round(bench.median_ratio(times["synthetic"], times["input pipeline"]), 3)
  print(
    f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, paper net, batch {args.batch_size}, {args.dtype}: "
    f"synthetic {rows['synthetic']} images/s, input pipeline {rows['input pipeline']} images/s ({ratio}x)"
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
      }
    )
  )


if __name__ == "__main__":
  main()
