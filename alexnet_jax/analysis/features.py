"""fc7 features and top-5 predictions of a restored net, for a folder of images or a split of
its run's data (the work of `python -m alexnet_jax.extract`).

Images go through evaluation's own preprocessing and batches, on every device of the net's
mesh; each batch's rows go straight to the features file (`featurefile.Writer`), so memory
does not grow with the number of images. A folder's unreadable images are found first,
reported and left out. Class names are the run's own (classes.json).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging

from alexnet_jax.analysis import featurefile
from alexnet_jax.core.errors import UserInputError
from alexnet_jax.data import augment, datasets, image_files
from alexnet_jax.data.batches import eval_batches, numpy_iterator
from alexnet_jax.data.decoding import decode
from alexnet_jax.data.sources import Source, Split
from alexnet_jax.data.stats import Stats, load_stats
from alexnet_jax.model import sharding
from alexnet_jax.model.alexnet import AlexNet
from alexnet_jax.training import class_names
from alexnet_jax.training.restore import Restored

TOP_K = 5


@dataclasses.dataclass(frozen=True)
class Report:
  count: int  # images written
  skipped: tuple[str, ...] = ()  # unreadable images, left out


def find_images(folder: str) -> list[str]:
  """Every image (`image_files`) under folder, nested folders included, sorted."""
  if not os.path.isdir(folder):
    raise UserInputError(f"image folder {folder} does not exist")
  paths = sorted(
    os.path.join(root, f)
    for root, _, files in os.walk(folder)
    for f in files
    if image_files.is_image(f)
  )
  if not paths:
    raise UserInputError(f"no {image_files.NAMED} images in {folder} (nested folders included)")
  return paths


def readable(paths: Sequence[str], num_parallel_calls: int = -1) -> np.ndarray:
  """True where the file decodes as an image; checked first so that one bad file cannot stop a
  run."""

  def decodes(index, path):  # the shape is returned so that the decode is not pruned away
    return index, tf.shape(decode(tf.io.read_file(path)))

  ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), np.asarray(paths, str)))
  ok = np.zeros(len(paths), bool)
  checked = ds.map(decodes, num_parallel_calls=num_parallel_calls).ignore_errors().batch(1024)
  for index, _ in numpy_iterator(checked):
    ok[index] = True
  return ok


def run_classes(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, ...]:
  """The class names the run's labels index: its classes.json, written when it started. A
  run from before that file existed has its data opened instead, where it is on this machine."""
  names = class_names.read(workdir)
  if names is not None:
    return names
  try:
    return datasets.load_splits(config, os.path.abspath(workdir)).train.classes
  except UserInputError as e:
    logging.warning(
      "no class names: %s has no %s and its data is not here (%s)", workdir, class_names.FILE, e
    )
    return ()


_INPUTS = ("image", "offset", "flip")  # what augment.normalize reads from an eval batch


def _predictor(model: AlexNet, k: int):
  def predict(params, batch, mean_image):
    images = augment.normalize(batch, mean_image)  # as train's eval step does
    logits, state = model.apply({"params": params}, images, mutable=["intermediates"])
    prob, index = jax.lax.top_k(jax.nn.softmax(logits), k)
    return state["intermediates"]["features"]["fc7"].astype(jnp.float32), index, prob

  return jax.jit(predict)


def extract(
  restored: Restored,
  images: Source,
  stats: Stats,
  output: str,
  batch_size: int = 128,
) -> int:
  """Writes the features file `output` (see featurefile) for every image of `images`; returns the
  count.

  Images go through evaluation's own pipeline (`batches.eval_batches`, centre crop); each row
  is named as the source names its image (a path; SHARD_DIR#INDEX, NAME/SPLIT[INDEX]).
  batch_size is global and must divide over the mesh's data axis; the last batch is padded.
  """
  data_size = restored.mesh.shape["data"]
  if batch_size < 1 or batch_size % data_size:
    raise UserInputError(
      f"batch_size={batch_size} does not divide over the {data_size} devices; "
      f"use a multiple of {data_size}"
    )
  config, arch = restored.config, restored.model.arch
  k = min(TOP_K, config.num_classes)
  n = len(images)
  names = [images.describe(i) for i in range(n)]
  predict, put = _predictor(restored.model, k), sharding.batch_sharding(restored.mesh)
  mean_image = jax.device_put(stats.mean_image, sharding.replicated(restored.mesh))
  batches = eval_batches(
    images,
    batch_size=batch_size,
    image_size=config.image_size,
    resize_size=config.resize_size,
    crops=1,
    num_parallel_calls=config.num_parallel_calls,
  )
  writer = featurefile.Writer(output, n, arch.fc_widths[1] * arch.towers, k)
  start = last_log = time.monotonic()

  def write(batch, out):
    nonlocal last_log
    m = int(batch["mask"].sum())  # real images come first; padding is masked
    fc7, top_index, top_prob = (np.asarray(a)[:m] for a in jax.device_get(out))
    writer.append(
      fc7, top_index, top_prob, names[writer.count : writer.count + m], batch["label"][:m]
    )
    if time.monotonic() - last_log > 10 or writer.count == n:
      last_log = time.monotonic()
      logging.info(
        "extracted %d/%d images (%.1f images/s)", writer.count, n, writer.count / (last_log - start)
      )

  try:
    pending = None
    for batch in batches:
      out = predict(
        restored.params, jax.device_put({key: batch[key] for key in _INPUTS}, put), mean_image
      )
      if pending is not None:
        write(*pending)  # waits for the previous batch while this one runs
      pending = (batch, out)
    write(*pending)
    writer.close(images.classes, restored.step)
  finally:
    writer.discard()
  return n


def extract_folder(
  restored: Restored, workdir: str, folder: str, output: str, batch_size: int = 128
) -> Report:
  """Features of every readable image under folder; unreadable ones are reported and skipped.

  Args:
    restored: the trained net (`training.restore.restore(workdir)`).
    workdir: its run's folder: the mean image it trained with (stats.npz) and its class
      names (classes.json) come from there; the dataset is not opened.
    folder: images (.jpg, .jpeg, .png), nested folders included.
    output: the features file to write (.npz, see featurefile), whole or not at all.
    batch_size: images per batch over all devices; a multiple of the mesh's data axis.

  Returns:
    Report(count, skipped): the images written and the unreadable ones left out.
  """
  paths = find_images(folder)
  ok = readable(paths, restored.config.num_parallel_calls)
  skipped = tuple(p for p, good in zip(paths, ok) if not good)
  for path in skipped:
    logging.warning("skipped unreadable image %s", path)
  if not ok.any():
    raise UserInputError(
      f"none of the {len(paths)} images in {folder} could be read as JPEG or PNG"
    )
  stats = load_stats(workdir, restored.config.resize_size, restored.config.channel_mean)
  kept = [p for p, good in zip(paths, ok) if good]
  classes = run_classes(restored.config, workdir)
  images = Split(tuple(kept), np.full(len(kept), -1, np.int32), classes)
  return Report(extract(restored, images, stats, output, batch_size), skipped)


def extract_split(
  restored: Restored, workdir: str, split: str, output: str, batch_size: int = 128
) -> Report:
  """Features of the run's own train or val split, with their labels.

  Args:
    restored: the trained net (`training.restore.restore(workdir)`).
    workdir: its run's folder; the run's config names the data, read as training read it.
    split: "train" or "val".
    output: the features file to write (.npz, see featurefile), whole or not at all.
    batch_size: images per batch over all devices; a multiple of the mesh's data axis.

  Returns:
    Report(count): the images written.
  """
  data = datasets.load_splits(restored.config, os.path.abspath(workdir))
  images = data.train if split == "train" else data.val
  return Report(extract(restored, images, data.stats, output, batch_size))
