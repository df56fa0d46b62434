"""Training input per CPU core, by storage: raw prepared shards (`prepare --format=raw`:
decoded uint8 arrays), prepared 256x256 JPEG shards and TFDS originals (ImageNet-sized
500x375 JPEGs in a TFDS ArrayRecord dataset, read by `dataset=tfds:NAME`), with the bare
JPEG decode of each JPEG source; images/s per core at batch 256.

  python benchmarks/input_pipeline.py [--images=600] [--seconds=10] [--rounds=3]

Every side reads the same images on one thread (num_parallel_calls=1: one tf.data map
thread, or for raw shards, which need no tf.data, one copying thread), in one process,
alternating rounds, so the ratios are fair on a noisy machine; the raw pipeline also runs
with two threads: its figure on two cores, and, scaled linearly, a prediction for a 16-core
host. The last line is JSON.
The augmentation side is the real training pipeline: every random draw (227 window,
flip, PCA colour alphas) and the fused decode-and-crop; the per-pixel arithmetic (mean
image at the crop's position, colour, reflection) runs fused in the train step on the
device (`alexnet_jax.data.augment`), so it is not a host cost.
"""

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import tensorflow as tf
from absl import flags
from PIL import Image

from alexnet_jax.core import cli
from alexnet_jax.data import prepare_shards, sources, tfds_source
from alexnet_jax.data.batches import numpy_iterator, train_batches
from alexnet_jax.data.stats import load_stats


def make_folder(root: str, images: int) -> None:
  """Photo-like test images (smooth shapes plus noise) of ImageNet's typical 500x375 size."""
  rng = np.random.default_rng(0)
  for split, count in (("train", images), ("val", 10)):
    os.makedirs(os.path.join(root, split, "c"), exist_ok=True)
    for i in range(count):
      low = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
      image = np.asarray(Image.fromarray(low).resize((500, 375), Image.BICUBIC), np.float32)
      image += rng.normal(0, 10, image.shape)
      Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
        os.path.join(root, split, "c", f"{i}.jpg"), quality=90
      )


def store_as_tfds(folder: str, data_dir: str) -> None:
  """The folder's train JPEGs, bytes unchanged, as a TFDS dataset in ArrayRecord files."""
  import tensorflow_datasets as tfds

  paths = sorted(os.listdir(os.path.join(folder, "train", "c")))
  tfds.dataset_builders.store_as_tfds_dataset(
    name="originals",
    version="1.0.0",
    features=tfds.features.FeaturesDict(
      {
        "image": tfds.features.Image(encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(names=["c"]),
      }
    ),
    split_datasets={
      split: [(p, {"image": os.path.join(folder, "train", "c", p), "label": 0}) for p in paths]
      for split in ("train", "validation")
    },
    data_dir=data_dir,
    file_format="array_record",
  )


def bare_decode(split: sources.Shards | sources.Records, batch: int):
  """The bare decode of every image of the split (its reader's `decoded`), one thread,
  nothing else."""
  decoded = split.reader().decoded
  return numpy_iterator(
    tf.data.Dataset.range(len(split))
    .repeat()
    .map(lambda i: decoded(i)[0], num_parallel_calls=1)
    .batch(batch)
    .prefetch(2)
  )


def rate(iterator, seconds: float, batch: int) -> float:
  next(iterator)  # warm up
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(iterator)
    count += batch
  return count / (time.perf_counter() - start)


def define_flags() -> None:
  flags.DEFINE_integer("images", 600, "Training images to prepare.")
  flags.DEFINE_float("seconds", 10.0, "Seconds per side per round.")
  flags.DEFINE_integer("rounds", 3, "Alternating timing rounds.")


def main() -> None:
  args = flags.FLAGS
  with tempfile.TemporaryDirectory() as tmp:
    make_folder(os.path.join(tmp, "raw"), args.images)
    out = os.path.join(tmp, "out")
    prepare_shards.prepare(os.path.join(tmp, "raw"), out, stats_images=100)
    shards = sources.read_prepared(out).train  # JPEG, read before to_raw marks the info raw
    prepare_shards.to_raw(out)
    raw = sources.read_prepared(out).train
    store_as_tfds(os.path.join(tmp, "raw"), os.path.join(tmp, "tfds"))
    originals = tfds_source.open_splits("originals", os.path.join(tmp, "tfds"), "train", "").train
    stats = load_stats(out, 256, (0, 0, 0))
    batch = 256
    crops = dict(batch_size=batch, image_size=227, resize_size=256)  # the paper's, one thread
    sides = {
      "raw shards, training pipeline": train_batches(
        raw, stats=stats, seed=0, num_parallel_calls=1, **crops
      ),
      "raw shards, training pipeline, 2 threads": train_batches(
        raw, stats=stats, seed=0, num_parallel_calls=2, **crops
      ),
      "prepared shards, bare decode (256x256 JPEG)": bare_decode(shards, batch),
      "prepared shards, training pipeline": train_batches(
        shards, stats=stats, seed=0, num_parallel_calls=1, **crops
      ),
      "TFDS originals, bare decode (500x375 JPEG)": bare_decode(originals, batch),
      "TFDS originals, training pipeline": train_batches(
        originals, stats=stats, seed=0, num_parallel_calls=1, **crops
      ),
    }
    rates = {name: [] for name in sides}
    for _ in range(args.rounds):
      for name, iterator in sides.items():
        rates[name].append(rate(iterator, args.seconds, batch))
  median = {name: float(np.median(r)) for name, r in rates.items()}
  for name, value in median.items():
    print(f"{name + ':':46s}{value:8.1f} images/s")
  raw_one, two, shard_decode, shard_train, tfds_decode, tfds_train = median.values()
  to_device = 227 * 227 * 3 + 4 + 8 + 1 + 12  # uint8 crop, label, offset, flip, colour
  print(f"predicted for a 16-core host (8 x 2 cores):   {8 * two:8.0f} images/s")
  print(f"bytes per image to the device:                {to_device:8d}")
  print(
    json.dumps(
      {
        "raw_images_per_sec_per_core": round(raw_one, 1),
        "raw_images_per_sec_two_cores": round(two, 1),
        "raw_predicted_images_per_sec_16_cores": round(8 * two),
        "raw_over_jpeg": round(raw_one / shard_train, 3),
        "decode_images_per_sec_per_core": round(shard_decode, 1),
        "augment_images_per_sec_per_core": round(shard_train, 1),
        "augment_over_decode": round(shard_train / shard_decode, 3),
        "tfds_decode_images_per_sec_per_core": round(tfds_decode, 1),
        "tfds_augment_images_per_sec_per_core": round(tfds_train, 1),
        "prepared_over_tfds": round(shard_train / tfds_train, 3),
        "bytes_per_image_to_device": to_device,
      }
    )
  )


if __name__ == "__main__":
  cli.run(main, define_flags)
