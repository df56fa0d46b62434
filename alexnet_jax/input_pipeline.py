"""tf.data input: image folders in the ImageNet layout, the paper's rescale and crops.

Training order is a pure function of (seed, epoch): every epoch is a fresh global
permutation of the split, cut into equal disjoint shares, one per process, and every
image's crop and flip are drawn from (seed, its position in the stream). A run restarted
at step s therefore sees exactly the batches it would have seen. TensorFlow runs on the
CPU only; it never takes an accelerator from JAX.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

from alexnet_jax.errors import UserInputError

tf.config.set_visible_devices([], "GPU")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclasses.dataclass(frozen=True)
class Split:
  """The files of one split, their labels and the class names the labels index."""
  paths: tuple[str, ...]
  labels: np.ndarray
  classes: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.paths)


def _class_folders(split_dir: str) -> list[str]:
  return sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))


def _images_in(folder: str) -> list[str]:
  return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))


def read_split(data_dir: str, split: str, classes: Sequence[str] | None = None) -> Split:
  """Lists DIR/split/<class>/* (JPEG, PNG). Class names sorted give the labels, from train."""
  split_dir = os.path.join(data_dir, split)
  if not os.path.isdir(split_dir):
    raise UserInputError(f"no {split!r} folder in data_dir {data_dir!r}: expected {split_dir}/<class>/<image>.jpg; "
                     "set --config.data_dir to a folder with train/ and val/ class folders")
  found = _class_folders(split_dir)
  if not found:
    raise UserInputError(f"{split_dir} has no class folders: put each class's images in {split_dir}/<class>/")
  if classes is None:
    classes = tuple(found)
  else:
    unknown = sorted(set(found) - set(classes))
    if unknown:
      raise UserInputError(f"class folder(s) {unknown[:5]} in {split_dir} are not in train/: "
                       "every val class needs a train folder of the same name")
  index = {name: i for i, name in enumerate(classes)}
  paths, labels = [], []
  for name in found:
    files = _images_in(os.path.join(split_dir, name))
    paths += files
    labels += [index[name]] * len(files)
  if not paths:
    raise UserInputError(f"no .jpg/.jpeg/.png images under {split_dir}/<class>/: the split is empty")
  return Split(tuple(paths), np.asarray(labels, np.int32), tuple(classes))


def read_image_folder(data_dir: str) -> tuple[Split, Split]:
  """The train and val splits of an image-folder dataset, checked before any work starts."""
  if not data_dir or not os.path.isdir(data_dir):
    raise UserInputError(f"data_dir {data_dir!r} does not exist: pass --config.data_dir=DIR with DIR/train/<class>/* "
                     "and DIR/val/<class>/*")
  train = read_split(data_dir, "train")
  return train, read_split(data_dir, "val", train.classes)


def _decode_and_rescale(path: tf.Tensor, resize_size: int) -> tf.Tensor:
  """The paper's down-sampling: shorter side to resize_size, then the central square (uint8)."""
  image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = resize_size / tf.reduce_min(shape)
  new = tf.cast(tf.math.round(shape * scale), tf.int32)
  new = tf.maximum(new, resize_size)
  image = tf.image.resize(image, new, method="bilinear", antialias=True)
  image = tf.image.resize_with_crop_or_pad(image, resize_size, resize_size)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _normalize(image: tf.Tensor, mean: Sequence[float]) -> tf.Tensor:
  return tf.cast(image, tf.float32) - tf.constant(mean, tf.float32)


def train_batches(split: Split, *, batch_size: int, image_size: int, resize_size: int,
                  mean: Sequence[float], seed: int, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, num_parallel_calls: int = -1) -> Iterator[dict]:
  """Endless training batches for this process: dicts of numpy 'image' (float32 NHWC) and 'label'.

  batch_size is this process's share of the global batch. Starting at `start_step`
  resumes the stream exactly where a run that did `start_step` steps left it.
  """
  n = len(split)
  per_host = n // process_count
  if per_host < batch_size:
    raise UserInputError(f"the train split has {n} images, fewer than one batch of {batch_size} per process; "
                     "lower --config.batch_size or add images")
  paths = tf.constant(split.paths)
  labels = tf.constant(split.labels)

  seed = tf.constant(seed, tf.int64)

  def epoch(e):
    perm = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), seed=tf.stack([seed, e]))
    share = perm[process_index * per_host:(process_index + 1) * per_host]
    position = e * n + process_index * per_host + tf.range(per_host, dtype=tf.int64)
    return tf.data.Dataset.from_tensor_slices((share, position))

  def load(index, position):
    image = _decode_and_rescale(tf.gather(paths, index), resize_size)
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(tf.stack([seed, position]), 2))
    image = tf.image.stateless_random_crop(image, (image_size, image_size, 3), seed=crop_seed)
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return {"image": _normalize(image, mean), "label": tf.gather(labels, index)}

  first = start_step * batch_size
  ds = tf.data.Dataset.range(first // per_host, 1 << 40).flat_map(epoch).skip(first % per_host)
  ds = ds.map(load, num_parallel_calls=num_parallel_calls, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(2)
  return ds.as_numpy_iterator()


def eval_batches(split: Split, *, batch_size: int, image_size: int, resize_size: int,
                 mean: Sequence[float], process_index: int = 0, process_count: int = 1,
                 num_parallel_calls: int = -1) -> Iterator[dict]:
  """The whole split once, centre crops, padded to full batches; 'mask' is 0 on padding.

  Every process yields the same number of batches (its share, padded), so that all of
  them step together; together the unpadded images cover the split exactly once.
  """
  n = len(split)
  per_host = -(-n // process_count)
  num_batches = max(1, -(-per_host // batch_size))
  index = np.arange(process_index * per_host, process_index * per_host + num_batches * batch_size)
  mask = (index < min(n, (process_index + 1) * per_host)).astype(np.float32)
  index = np.where(mask > 0, index, 0)
  paths = tf.constant(split.paths)

  def load(i, m):
    image = _decode_and_rescale(tf.gather(paths, i), resize_size)
    image = tf.image.resize_with_crop_or_pad(image, image_size, image_size)
    return {"image": _normalize(image, mean), "label": tf.gather(split.labels, i), "mask": m}

  ds = tf.data.Dataset.from_tensor_slices((index, mask))
  ds = ds.map(load, num_parallel_calls=num_parallel_calls, deterministic=True)
  return ds.batch(batch_size).prefetch(2).as_numpy_iterator()
