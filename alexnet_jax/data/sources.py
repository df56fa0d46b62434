"""The splits training reads, behind one protocol: image folders in the ImageNet layout,
the shards `prepare` wrote (JPEG or raw), and TFDS records.

A source says how many images it has, their classes, how to name one in a message, whether
they are stored at a prepared side, and how they are read (`read`): it hands a stream its
reader, a tf.data one (`decoding`) or, for raw shards, memory-mapped arrays. The batch
streams, the statistics and feature extraction take any source and never ask which it is.
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple, Protocol, Sequence, TypeVar

import numpy as np
import tensorflow as tf

from alexnet_jax.core.errors import UserInputError
from alexnet_jax.data import image_files, shard_format
from alexnet_jax.data.decoding import Decoded, GraphReader, PreparedJpeg, example_reader

T = TypeVar("T", covariant=True)


@dataclasses.dataclass(frozen=True)
class RawArrays:
  """Raw shards opened: the memory-mapped (n, side, side, 3) uint8 arrays, every label in
  split order, and each shard's first index."""

  images: list[np.ndarray]
  labels: np.ndarray
  starts: np.ndarray

  def patches(self, index: np.ndarray, offsets: np.ndarray, size: int) -> np.ndarray:
    """(n, k, size, size, 3) uint8: the k windows at offsets[j] ((k, 2): y, x) of image
    index[j], each one strided copy out of its array (numpy releases the GIL while it copies)."""
    shard = np.searchsorted(self.starts, index, side="right") - 1
    rows = index - self.starts[shard]
    out = np.empty((len(index), offsets.shape[1], size, size, 3), np.uint8)
    for j, (s, r) in enumerate(zip(shard, rows)):
      for k, (y, x) in enumerate(offsets[j]):
        out[j, k] = self.images[s][r, y : y + size, x : x + size]
    return out


class Stream(Protocol[T]):
  """What reads a source (the batch streams, the statistics' sample): `Source.read` calls the
  one method that fits how the source is stored."""

  def graph(self, reader: GraphReader) -> T:
    """The stream over images read in tf.data graphs."""

  def arrays(self, arrays: RawArrays) -> T:
    """The stream over raw arrays, without tf.data."""


class Source(Protocol):
  """A split: its images by index, their labels and the class names the labels index."""

  classes: tuple[str, ...]
  side: int | None  # the side its images are stored at (prepared), None: any size, rescaled

  def __len__(self) -> int: ...

  def describe(self, index: int) -> str:
    """Image `index` named for a person: its path, or where it is stored."""

  def read(self, stream: Stream[T]) -> T:
    """`stream` over this source's images: stream.graph(its tf.data reader), or for raw
    shards stream.arrays(its arrays)."""


@dataclasses.dataclass(frozen=True)
class Split:
  """The files of one split of an image folder, their labels and the class names."""

  paths: tuple[str, ...]
  labels: np.ndarray
  classes: tuple[str, ...]
  side = None

  def __len__(self) -> int:
    return len(self.paths)

  def describe(self, index: int) -> str:
    return self.paths[index]

  def reader(self) -> Decoded:
    paths, labels = tf.constant(self.paths), tf.constant(self.labels)
    return Decoded(
      lambda i: (tf.io.read_file(tf.gather(paths, i)), tf.gather(labels, i)),
      lambda i: tf.gather(labels, i),
    )

  def read(self, stream: Stream[T]) -> T:
    return stream.graph(self.reader())


@dataclasses.dataclass(frozen=True)
class Records:
  """A split of serialized tf.Examples read by index (a TFDS dataset's ArrayRecord files):
  encoded images of any size under `image_key`, rescaled on the fly as a folder's are, and
  their class under `label_key`."""

  source: Sequence[bytes]
  image_key: str
  label_key: str
  classes: tuple[str, ...]
  name: str  # for messages: "imagenet2012:5.1.0/train"
  side = None

  def __len__(self) -> int:
    return len(self.source)

  def describe(self, index: int) -> str:
    return f"{self.name}[{index}]"

  def reader(self) -> Decoded:
    """An unreadable record keeps label 0: its label is in the record."""
    read = example_reader(self.source, self.image_key, self.label_key)
    return Decoded(read, lambda i: tf.constant(0, tf.int32))

  def read(self, stream: Stream[T]) -> T:
    return stream.graph(self.reader())


@dataclasses.dataclass(frozen=True)
class Shards:
  """A split written by `alexnet_jax.prepare`: ArrayRecord shards of side x side JPEG examples."""

  files: tuple[str, ...]
  size: int
  classes: tuple[str, ...]
  side: int

  def __len__(self) -> int:
    return self.size

  def describe(self, index: int) -> str:
    return f"{os.path.dirname(self.files[0])}#{index}"

  def reader(self) -> PreparedJpeg:
    """Reads by index (random access); each reader opens the shards anew."""
    records = shard_format.record_source(self.files)
    read = example_reader(records, shard_format.IMAGE_KEY, shard_format.LABEL_KEY)
    return PreparedJpeg(read, self.side)

  def read(self, stream: Stream[T]) -> T:
    return stream.graph(self.reader())


@dataclasses.dataclass(frozen=True)
class RawShards:
  """A split written by `prepare --format=raw`: per shard one (n, side, side, 3) uint8 .npy
  array, memory-mapped (an image is one contiguous read, nothing to decode), and its labels.
  The pixels are those of the JPEG shards they were decoded from."""

  files: tuple[str, ...]
  counts: tuple[int, ...]
  classes: tuple[str, ...]
  side: int

  def __len__(self) -> int:
    return sum(self.counts)

  def describe(self, index: int) -> str:
    return f"{os.path.dirname(self.files[0])}#{index}"

  def open(self) -> RawArrays:
    """The arrays, checked against the counts `prepare` recorded."""
    images, labels = [], []
    for path, count in zip(self.files, self.counts):
      array = np.load(path, mmap_mode="r")
      label = np.load(shard_format.raw_labels_path(path))
      if array.shape != (count, self.side, self.side, 3) or label.shape != (count,):
        raise UserInputError(
          f"raw shard {path} holds {array.shape} images and {label.shape} labels, not the "
          f"{count} {self.side}x{self.side} of its info file: it is damaged or from another "
          "run; delete it and rerun `python -m alexnet_jax.prepare --format=raw --data_dir=...`"
        )
      images.append(array)
      labels.append(label.astype(np.int32))
    starts = np.cumsum([0, *self.counts[:-1]])
    return RawArrays(images, np.concatenate(labels), starts)

  def read(self, stream: Stream[T]) -> T:
    return stream.arrays(self.open())


class Splits(NamedTuple):
  train: Source
  val: Source


def _class_folders(split_dir: str) -> list[str]:
  return sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))


def _images_in(folder: str) -> list[str]:
  return sorted(os.path.join(folder, f) for f in os.listdir(folder) if image_files.is_image(f))


def read_split(data_dir: str, split: str, classes: Sequence[str] | None = None) -> Split:
  """Lists DIR/split/<class>/* (JPEG, PNG). Class names sorted give the labels, from train."""
  split_dir = os.path.join(data_dir, split)
  if not os.path.isdir(split_dir):
    raise UserInputError(
      f"no {split!r} folder in data_dir {data_dir!r}: expected {split_dir}/<class>/<image>.jpg; "
      "set --config.data_dir to a folder with train/ and val/ class folders"
    )
  found = _class_folders(split_dir)
  if not found:
    raise UserInputError(
      f"{split_dir} has no class folders: put each class's images in {split_dir}/<class>/"
    )
  if classes is None:
    classes = tuple(found)
  else:
    unknown = sorted(set(found) - set(classes))
    if unknown:
      raise UserInputError(
        f"class folder(s) {unknown[:5]} in {split_dir} are not in train/: "
        "every val class needs a train folder of the same name"
      )
  index = {name: i for i, name in enumerate(classes)}
  paths, labels = [], []
  for name in found:
    images = _images_in(os.path.join(split_dir, name))
    paths += images
    labels += [index[name]] * len(images)
  if not paths:
    raise UserInputError(
      f"no {image_files.NAMED} images under {split_dir}/<class>/: the split is empty"
    )
  return Split(tuple(paths), np.asarray(labels, np.int32), tuple(classes))


def read_image_folder(data_dir: str) -> Splits:
  """The train and val splits of an image-folder dataset, checked before any work starts."""
  if not data_dir or not os.path.isdir(data_dir):
    raise UserInputError(
      f"data_dir {data_dir!r} does not exist: pass --config.data_dir=DIR with DIR/train/<class>/* "
      "and DIR/val/<class>/*"
    )
  train = read_split(data_dir, "train")
  return Splits(train, read_split(data_dir, "val", train.classes))


def read_prepared(data_dir: str) -> Splits:
  """The train and val shards of a prepared data_dir, in the format `prepare` wrote last."""
  info = shard_format.read_finished_info(data_dir)
  if info is None:
    raise UserInputError(
      f"no prepared dataset at data_dir={data_dir!r} ({shard_format.INFO_FILE} missing): "
      "download ILSVRC2012_img_train.tar "
      "and ILSVRC2012_img_val.tar from image-net.org into DIR, run `python -m alexnet_jax.prepare "
      "--manual_dir=DIR --data_dir=OUT`, then pass --config.data_dir=OUT (or, for ImageNet "
      "built by TFDS, --config.dataset=tfds:imagenet2012)"
    )
  return Splits(*(_prepared_split(data_dir, info, name) for name in shard_format.SPLITS))


def _prepared_split(data_dir: str, info: shard_format.Info, name: str) -> Shards | RawShards:
  if info.format == "raw":
    files = info.paths(data_dir, name, raw=True)
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
      raise UserInputError(
        f"raw {name} shards missing in {data_dir}: {missing[:3]}; rerun "
        f"`python -m alexnet_jax.prepare --format=raw --data_dir={data_dir}` to write them"
      )
    split = RawShards(files, info.splits[name].raw_counts, info.classes, info.side)
    split.open()  # sizes checked now, before any work (memory maps: nothing is read)
    return split
  files = info.paths(data_dir, name)
  missing = [f for f in files if not os.path.exists(f)]
  if missing or not files:
    raise UserInputError(
      f"prepared {name} shards missing in {data_dir}: {missing[:3] or 'none listed'}; "
      "rerun `python -m alexnet_jax.prepare` to finish them"
    )
  return Shards(files, info.splits[name].num_images, info.classes, info.side)
