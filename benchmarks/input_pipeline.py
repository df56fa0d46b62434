"""Training augmentation vs bare JPEG decode on prepared 256x256 shards, images/s per CPU core.

  python benchmarks/input_pipeline.py [--images=600] [--seconds=20]

Both sides read the same shards with one map thread (num_parallel_calls=1) and batch the
same way, in one process, alternating rounds, so the ratio is fair on a noisy machine.
The augmentation side is the real training pipeline: every random draw (227 window,
flip, PCA colour alphas) and the fused decode-and-crop; the per-pixel arithmetic (mean
image at the crop's position, colour, reflection) runs fused in the train step on the
device (`alexnet_jax.augment`), so it is not a host cost.
"""

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from absl import flags
from PIL import Image

from alexnet_jax import cli, prepare
from alexnet_jax import input_pipeline as ip


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
  tf = ip.tf
  with tempfile.TemporaryDirectory() as tmp:
    make_folder(os.path.join(tmp, "raw"), args.images)
    prepare.prepare(os.path.join(tmp, "raw"), os.path.join(tmp, "out"), stats_images=100)
    train, _ = ip.read_prepared(os.path.join(tmp, "out"))
    stats = ip.load_stats(os.path.join(tmp, "out"), 256, (0, 0, 0))
    batch = 64
    whole, _ = ip.readers(train)
    bare = (
      tf.data.Dataset.range(len(train))
      .repeat()
      .map(lambda i: whole(i)[0], num_parallel_calls=1)
      .batch(batch)
      .prefetch(2)
      .as_numpy_iterator()
    )
    crops = dict(batch_size=batch, image_size=227, resize_size=256)  # the paper's, one thread
    full = ip.train_batches(train, stats=stats, seed=0, num_parallel_calls=1, **crops)
    decode, augment = [], []
    for _ in range(args.rounds):
      decode.append(rate(bare, args.seconds, batch))
      augment.append(rate(full, args.seconds, batch))
    d, a = float(np.median(decode)), float(np.median(augment))
    print(f"bare decode (256x256 JPEG):          {d:8.1f} images/s per core")
    print(f"full training augmentation (227):    {a:8.1f} images/s per core")
    print(
      json.dumps(
        {
          "decode_images_per_sec_per_core": round(d, 1),
          "augment_images_per_sec_per_core": round(a, 1),
          "augment_over_decode": round(a / d, 3),
        }
      )
    )


if __name__ == "__main__":
  cli.run(main, define_flags)
