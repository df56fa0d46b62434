"""The statistics training subtracts and jitters colour with, and the one file that keeps them.

stats.npz is written by `write_stats` alone (by `prepare` beside its shards, beside a TFDS
dataset on first use, by training in its workdir, so that its features can be extracted away
from its data) and read by `read_stats` alone, in a local folder or a bucket (gs://: uploaded
whole, read from the object's bytes). No TensorFlow here.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Iterable, Sequence

import numpy as np

from alexnet_jax.core import files, storage
from alexnet_jax.core.errors import UserInputError

STATS_FILE = "stats.npz"

# The widely used ImageNet colour statistics (fb.resnet.torch; pixels in [0, 1]): the
# eigenvalues of the RGB covariance and its eigenvectors as columns.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
  (-0.5675, 0.7192, 0.4009),
  (-0.5808, -0.0045, -0.8140),
  (-0.5836, -0.6948, 0.4203),
)


@dataclasses.dataclass(frozen=True)
class Stats:
  """What training subtracts and how it jitters colour: a (side, side, 3) mean image in 0-255,
  and the eigenvalues/eigenvectors (columns) of the covariance of [0, 1] RGB values."""

  mean_image: np.ndarray
  eigval: np.ndarray
  eigvec: np.ndarray
  num_images: int = 0  # the images they were computed from; 0: the ImageNet constants


def image_stats(images: Iterable[np.ndarray]) -> Stats:
  """The per-pixel mean image of same-sized uint8 images (0-255) and the eigen-decomposition
  of their RGB covariance (pixels in [0, 1]), eigenvalues descending."""
  count, total, moment = 0, 0.0, np.zeros((3, 3), np.float64)
  for image in images:
    pixels = np.asarray(image, np.float64)
    total = total + pixels
    flat = pixels.reshape(-1, 3) / 255.0
    moment += flat.T @ flat / flat.shape[0]
    count += 1
  if count == 0:
    raise UserInputError(
      "no readable training images to compute the mean image and colour PCA from: "
      "replace the corrupt or missing files"
    )
  mean_image = total / count
  mean_rgb = mean_image.reshape(-1, 3).mean(0) / 255.0
  eigval, eigvec = np.linalg.eigh(moment / count - np.outer(mean_rgb, mean_rgb))
  order = np.argsort(eigval)[::-1]
  return Stats(
    mean_image.astype(np.float32),
    eigval[order].astype(np.float32),
    eigvec[:, order].astype(np.float32),
    count,
  )


def write_stats(directory: str, stats: Stats) -> None:
  """directory/stats.npz, written whole or not at all."""
  with files.atomic_path(storage.join(directory, STATS_FILE)) as tmp:
    np.savez(
      tmp,
      mean_image=stats.mean_image,
      eigval=stats.eigval,
      eigvec=stats.eigvec,
      num_images=np.int64(stats.num_images),
    )


def read_stats(directory: str) -> Stats | None:
  """directory/stats.npz as written, None where there is none."""
  if not directory:
    return None
  try:
    data = storage.path(directory).joinpath(STATS_FILE).read_bytes()
  except FileNotFoundError:
    return None
  with np.load(io.BytesIO(data)) as f:
    count = int(f["num_images"]) if "num_images" in f else 0  # older workdirs hold none
    return Stats(f["mean_image"], f["eigval"], f["eigvec"], count)


def load_stats(
  data_dir: str, side: int, channel_mean: Sequence[float], per_pixel: bool = True
) -> Stats:
  """What training uses: data_dir's statistics where it has some, else the ImageNet constants.

  per_pixel: subtract the mean image (the paper); otherwise its per-channel mean. Without
  statistics, the mean image is `channel_mean` everywhere.
  """
  saved = read_stats(data_dir)
  if saved is None:
    mean_image = np.broadcast_to(np.asarray(channel_mean, np.float32), (side, side, 3))
    saved = Stats(mean_image, np.asarray(IMAGENET_EIGVAL), np.asarray(IMAGENET_EIGVEC))
  elif saved.mean_image.shape != (side, side, 3):
    raise UserInputError(
      f"{storage.join(data_dir, STATS_FILE)} holds a {saved.mean_image.shape[0]}-pixel mean "
      f"image but resize_size={side}; set --config.resize_size={saved.mean_image.shape[0]}"
    )
  mean_image = saved.mean_image
  if not per_pixel:
    mean_image = np.broadcast_to(mean_image.reshape(-1, 3).mean(0), (side, side, 3))
  return Stats(
    np.asarray(mean_image, np.float32),
    np.asarray(saved.eigval, np.float32),
    np.asarray(saved.eigvec, np.float32),
    saved.num_images,
  )
