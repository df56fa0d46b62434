"""fc7 features and top-5 predictions of a restored net, for a folder of images or a split of
its run's data (the work of `python -m alexnet_jax.extract`).

Images go through evaluation's own preprocessing and batches, on every device of the net's
mesh; each batch's rows go straight to the features file (`featurefile.Writer`), so memory
does not grow with the number of images. A folder's unreadable images are found first,
reported and left out. Class names are the run's own (classes.json).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging

from alexnet_jax.analysis import featurefile
from alexnet_jax.core import storage
from alexnet_jax.core.errors import UserInputError
from alexnet_jax.data import augment, datasets, image_files
from alexnet_jax.data.batches import eval_batches, numpy_iterator
from alexnet_jax.data.decoding import Crops, decode
from alexnet_jax.data.sources import RawArrays, Source, Split
from alexnet_jax.data.stats import Stats, load_stats
from alexnet_jax.model import backend, sharding
from alexnet_jax.model.alexnet import AlexNet
from alexnet_jax.training import class_names, preemption
from alexnet_jax.training.restore import Restored

TOP_K = 5


@dataclasses.dataclass(frozen=True)
class Report:
  count: int  # images written
  skipped: tuple[str, ...] = ()  # unreadable images, left out


def find_images(folder: str) -> list[str]:
  """Every image (`image_files`) under folder, nested folders included, sorted."""
  if storage.is_remote(folder):  # tf.data would read it through TensorFlow's own GCS client
    raise UserInputError(
      f"--images={folder}: extraction reads images from a local folder; copy them to one first "
      f"(gcloud storage cp -r {folder} LOCAL_FOLDER) and pass that"
    )
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
    return datasets.load_splits(config, storage.absolute(workdir)).train.classes
  except UserInputError as e:
    logging.warning(
      "no class names: %s has no %s and its data is not here (%s)", workdir, class_names.FILE, e
    )
    return ()


_INPUTS = ("image", "offset", "flip")  # what augment.normalize reads from an eval batch


def predictor(model: AlexNet, k: int, cpu_set: str = "auto"):
  """The jitted net extraction runs on each batch: (params, batch, mean_image) -> (fc7,
  the top-k classes, their probabilities), compiled with the backend's options as training
  (`backend.compiler_options`, the run's cpu_compiler_options). fc7 is float32 whatever the
  model's dtype."""

  def predict(params, batch, mean_image):
    images = augment.normalize(batch, mean_image)  # as train's eval step does
    logits, state = model.apply({"params": params}, images, mutable=["intermediates"])
    prob, index = jax.lax.top_k(jax.nn.softmax(logits), k)
    return state["intermediates"]["features"]["fc7"].astype(jnp.float32), index, prob

  return jax.jit(predict, compiler_options=backend.compiler_options(cpu_set=cpu_set))


class Stopped(UserInputError):
  """SIGTERM or SIGINT stopped an extraction between batches; its rows are kept to resume."""


@dataclasses.dataclass(frozen=True)
class _Tail:
  """The images of `source` from `start` on (a Source): what a resumed extraction reads."""

  source: Source
  start: int

  @property
  def classes(self) -> tuple[str, ...]:
    return self.source.classes

  @property
  def side(self) -> int | None:
    return self.source.side

  def __len__(self) -> int:
    return len(self.source) - self.start

  def describe(self, index: int) -> str:
    return self.source.describe(index + self.start)

  def read(self, stream):
    return self.source.read(_Shifted(stream, self.start))


@dataclasses.dataclass(frozen=True)
class _Shifted:
  """A stream that reads image i + start where it asks for image i."""

  stream: Any
  start: int

  def graph(self, reader):
    return self.stream.graph(_ShiftedReader(reader, self.start))

  def arrays(self, arrays: RawArrays):
    shifted = RawArrays(arrays.images, arrays.labels[self.start :], arrays.starts - self.start)
    return self.stream.arrays(shifted)


@dataclasses.dataclass(frozen=True)
class _ShiftedReader:
  reader: Any
  start: int

  @property
  def fallible(self) -> bool:
    return self.reader.fallible

  def decoded(self, index):
    return self.reader.decoded(index + self.start)

  def crops(self, ds, want: Crops):
    def index_of(*element):
      return want.index_of(*element) + self.start

    return self.reader.crops(ds, dataclasses.replace(want, index_of=index_of))


def _layout(restored: Restored) -> tuple[int, int]:
  """(fc7's width, the predictions kept per image) of the restored net."""
  arch = restored.model.arch
  return arch.fc_widths[1] * arch.towers, min(TOP_K, restored.config.num_classes)


def _digest(*values: Any) -> str:
  h = hashlib.sha256()
  for value in values:
    h.update(value if isinstance(value, bytes) else np.ascontiguousarray(value).tobytes())
  return h.hexdigest()


def _identity(restored: Restored, names: Sequence[str], stats: Stats) -> dict[str, Any]:
  """What makes a partial extraction this one: the net (its weights, config and step), the
  images (their names, in order) and the mean image subtracted from them."""
  return {
    "params": _digest(*jax.tree.leaves(jax.device_get(restored.params))),
    "config": _digest(restored.config.to_json(sort_keys=True).encode()),
    "step": restored.step,
    "images": _digest("\n".join(names).encode()),
    "mean_image": _digest(stats.mean_image),
  }


def extract(
  restored: Restored,
  images: Source,
  stats: Stats,
  output: str,
  batch_size: int = 128,
) -> int:
  """Writes the features file `output` (see featurefile) for every readable image of
  `images`; returns the rows written.

  Images go through evaluation's own pipeline (`batches.eval_batches`, centre crop); each row
  is named as the source names its image (a path; SHARD_DIR#INDEX, NAME/SPLIT[INDEX]).
  batch_size is global and must divide over the mesh's data axis; the last batch is padded.
  The disk's free space is checked first. SIGTERM or SIGINT stops between batches (`Stopped`)
  and the same call again goes on from there; so does one after a crash or a kill, from the
  rows recorded last (every 10 s).
  """
  data_size = restored.mesh.shape["data"]
  if batch_size < 1 or batch_size % data_size:
    raise UserInputError(
      f"batch_size={batch_size} does not divide over the {data_size} devices; "
      f"use a multiple of {data_size}"
    )
  config = restored.config
  dim, k = _layout(restored)
  n = len(images)
  names = [images.describe(i) for i in range(n)]
  writer = featurefile.Writer(
    output, n, dim, k, _identity(restored, names, stats), max(map(len, names))
  )
  if writer.images_done:
    logging.info("resuming the extraction into %s at image %d of %d", output, writer.images_done, n)
  predict = predictor(restored.model, k, config.get("cpu_compiler_options", "auto"))
  put = sharding.batch_sharding(restored.mesh)
  mean_image = jax.device_put(stats.mean_image, sharding.replicated(restored.mesh))
  start = last_log = time.monotonic()
  position = writer.images_done  # the next image to write (or skip, if unreadable)

  def write(batch, out):
    nonlocal last_log, position
    real = min(batch_size, n - position)  # padding follows the real images
    keep = batch["mask"][:real] > 0  # unreadable images are masked out
    fc7, top_index, top_prob = (np.asarray(a)[:real][keep] for a in jax.device_get(out))
    batch_names = names[position : position + real]
    for name in np.asarray(batch_names)[~keep]:
      logging.warning("skipped unreadable image %s", name)
    writer.append(
      fc7,
      top_index,
      top_prob,
      [p for p, ok in zip(batch_names, keep) if ok],
      batch["label"][:real][keep],
    )
    position += real
    if time.monotonic() - last_log > 10 or position == n:
      last_log = time.monotonic()
      writer.save_progress(position)
      logging.info(
        "extracted %d/%d images (%.1f images/s)", position, n, position / (last_log - start)
      )

  with preemption.Watcher() as watcher:
    try:
      pending = None
      if position < n:
        tail = images if position == 0 else _Tail(images, position)
        batches = eval_batches(
          tail,
          batch_size=batch_size,
          image_size=config.image_size,
          resize_size=config.resize_size,
          crops=1,
          num_parallel_calls=config.num_parallel_calls,
        )
        for batch in batches:
          if watcher.signal_name:
            break
          out = predict(
            restored.params, jax.device_put({key: batch[key] for key in _INPUTS}, put), mean_image
          )
          if pending is not None:
            write(*pending)  # waits for the previous batch while this one runs
          pending = (batch, out)
        if pending is not None:
          write(*pending)
    except BaseException:
      writer.suspend(position)
      raise
    if position < n:
      writer.suspend(position)
      raise Stopped(
        f"{watcher.signal_name} received: stopped after {position} of {n} images, kept in "
        f"{writer.partial}; run the same command again to go on from there"
      )
    writer.close(images.classes, restored.step)
  return writer.count


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
  featurefile.check_space(output, len(paths), *_layout(restored), max(map(len, paths)))
  ok = readable(paths, restored.config.num_parallel_calls)  # decodes all: after the check
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
  data = datasets.load_splits(restored.config, storage.absolute(workdir))
  images = data.train if split == "train" else data.val
  return Report(extract(restored, images, data.stats, output, batch_size))
