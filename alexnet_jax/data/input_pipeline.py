"""tf.data input: image folders in the ImageNet layout, prepared shards and TFDS records; the
paper's rescale and crops.

Training order is a pure function of (seed, epoch): every epoch is a fresh global
permutation of the split, cut into equal disjoint shares, one per process, and every
image's crop and flip are drawn from (seed, its position in the stream). A run restarted
at step s therefore sees exactly the batches it would have seen. A folder image that cannot
be read is skipped in training and masked out in evaluation, and counted in both. TensorFlow
runs on the CPU only; it never takes an accelerator from JAX.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import threading
from typing import Iterable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from alexnet_jax.core import files
from alexnet_jax.core.errors import UserInputError

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

  def describe(self, index: int) -> str:
    return self.paths[index]


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

  def __len__(self) -> int:
    return len(self.source)

  def describe(self, index: int) -> str:
    return f"{self.name}[{index}]"


def _class_folders(split_dir: str) -> list[str]:
  return sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))


def _images_in(folder: str) -> list[str]:
  return sorted(
    os.path.join(folder, f)
    for f in os.listdir(folder)
    if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
  )


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
    files = _images_in(os.path.join(split_dir, name))
    paths += files
    labels += [index[name]] * len(files)
  if not paths:
    raise UserInputError(
      f"no .jpg/.jpeg/.png images under {split_dir}/<class>/: the split is empty"
    )
  return Split(tuple(paths), np.asarray(labels, np.int32), tuple(classes))


def read_image_folder(data_dir: str) -> tuple[Split, Split]:
  """The train and val splits of an image-folder dataset, checked before any work starts."""
  if not data_dir or not os.path.isdir(data_dir):
    raise UserInputError(
      f"data_dir {data_dir!r} does not exist: pass --config.data_dir=DIR with DIR/train/<class>/* "
      "and DIR/val/<class>/*"
    )
  train = read_split(data_dir, "train")
  return train, read_split(data_dir, "val", train.classes)


def decode(encoded: tf.Tensor) -> tf.Tensor:
  """An encoded image's pixels as (H, W, 3) uint8 (grayscale, CMYK and RGBA become RGB)."""
  return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def encoded_reader(split: Split | Records):
  """(read(index) -> (encoded image, int32 label), the step that fails on a bad file or
  record; label(index): what a folder's file names without reading it, 0 for a record)."""
  if isinstance(split, Records):
    source = split.source
    features = {
      split.image_key: tf.io.FixedLenFeature([], tf.string),
      split.label_key: tf.io.FixedLenFeature([], tf.int64),
    }

    def read(i):
      raw = tf.numpy_function(lambda j: source[int(j)], [i], tf.string, stateful=False)
      example = tf.io.parse_single_example(tf.reshape(raw, []), features)
      return example[split.image_key], tf.cast(example[split.label_key], tf.int32)

    return read, lambda i: tf.constant(0, tf.int32)
  paths, labels = tf.constant(split.paths), tf.constant(split.labels)
  return lambda i: (tf.io.read_file(tf.gather(paths, i)), tf.gather(labels, i)), (
    lambda i: tf.gather(labels, i)
  )


def _rescale(image: tf.Tensor, resize_size: int) -> tf.Tensor:
  """The paper's down-sampling: shorter side to resize_size, then the central square (uint8)."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = resize_size / tf.reduce_min(shape)
  new = tf.cast(tf.math.round(shape * scale), tf.int32)
  new = tf.maximum(new, resize_size)
  image = tf.image.resize(image, new, method="bilinear", antialias=True)
  image = tf.image.resize_with_crop_or_pad(image, resize_size, resize_size)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


# The widely used ImageNet colour statistics (fb.resnet.torch; pixels in [0, 1]): the
# eigenvalues of the RGB covariance and its eigenvectors as columns.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
  (-0.5675, 0.7192, 0.4009),
  (-0.5808, -0.0045, -0.8140),
  (-0.5836, -0.6948, 0.4203),
)
_FEATURES = {
  "image": tf.io.FixedLenFeature([], tf.string),
  "label": tf.io.FixedLenFeature([], tf.int64),
}
SHARD_INFO, SHARD_STATS = "dataset_info.json", "stats.npz"


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


@dataclasses.dataclass(frozen=True)
class RawShards:
  """A split written by `prepare --format=raw`: per shard one (n, side, side, 3) uint8 .npy
  array, memory-mapped (an image is one contiguous read, nothing to decode), and its labels
  (.labels.npy). The pixels are those of the JPEG shards they were decoded from."""

  files: tuple[str, ...]
  counts: tuple[int, ...]
  classes: tuple[str, ...]
  side: int

  def __len__(self) -> int:
    return sum(self.counts)

  def describe(self, index: int) -> str:
    return f"{os.path.dirname(self.files[0])}#{index}"

  def open(self) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """(the memory-mapped image arrays, every label in split order, each shard's first
    index), checked against the counts `prepare` recorded."""
    images, labels = [], []
    for path, count in zip(self.files, self.counts):
      array = np.load(path, mmap_mode="r")
      label = np.load(raw_labels_path(path))
      if array.shape != (count, self.side, self.side, 3) or label.shape != (count,):
        raise UserInputError(
          f"raw shard {path} holds {array.shape} images and {label.shape} labels, not the "
          f"{count} {self.side}x{self.side} of its info file: it is damaged or from another "
          "run; delete it and rerun `python -m alexnet_jax.prepare --format=raw --data_dir=...`"
        )
      images.append(array)
      labels.append(label.astype(np.int32))
    starts = np.cumsum([0, *self.counts[:-1]])
    return images, np.concatenate(labels), starts


def raw_labels_path(raw_path: str) -> str:
  return raw_path[: -len(".npy")] + ".labels.npy"


FORMATS = ("jpeg", "raw")  # of prepared shards, recorded in their info file


@dataclasses.dataclass(frozen=True)
class Stats:
  """What training subtracts and how it jitters colour: a (side, side, 3) mean image in 0-255,
  and the eigenvalues/eigenvectors (columns) of the covariance of [0, 1] RGB values."""

  mean_image: np.ndarray
  eigval: np.ndarray
  eigvec: np.ndarray


def read_prepared(data_dir: str) -> tuple[Shards, Shards] | tuple[RawShards, RawShards]:
  """The train and val shards of a prepared data_dir, in the format `prepare` wrote last."""
  path = os.path.join(data_dir or "", SHARD_INFO)
  if not os.path.exists(path):
    raise UserInputError(
      f"no prepared dataset at data_dir={data_dir!r} ({SHARD_INFO} missing): "
      "download ILSVRC2012_img_train.tar "
      "and ILSVRC2012_img_val.tar from image-net.org into DIR, run `python -m alexnet_jax.prepare "
      "--manual_dir=DIR --data_dir=OUT`, then pass --config.data_dir=OUT (or, for ImageNet "
      "built by TFDS, --config.dataset=tfds:imagenet2012)"
    )
  with open(path) as f:
    info = json.load(f)
  fmt = info.get("format", "jpeg")
  if fmt not in FORMATS:
    raise UserInputError(
      f"{path} names format {fmt!r}, which this version does not read ({', '.join(FORMATS)}): "
      "rerun `python -m alexnet_jax.prepare` with this version"
    )
  splits = []
  for name in ("train", "val"):
    if fmt == "raw":
      raw = info["splits"][name]["raw"]
      files = tuple(os.path.join(data_dir, name, f) for f in raw["files"])
      missing = [f for f in files if not os.path.exists(f)]
      if missing:
        raise UserInputError(
          f"raw {name} shards missing in {data_dir}: {missing[:3]}; rerun "
          f"`python -m alexnet_jax.prepare --format=raw --data_dir={data_dir}` to write them"
        )
      split = RawShards(files, tuple(raw["counts"]), tuple(info["classes"]), info["image_side"])
      split.open()  # sizes checked now, before any work (memory maps: nothing is read)
      splits.append(split)
      continue
    files = tuple(os.path.join(data_dir, name, f) for f in info["splits"][name]["files"])
    missing = [f for f in files if not os.path.exists(f)]
    if missing or not files:
      raise UserInputError(
        f"prepared {name} shards missing in {data_dir}: {missing[:3] or 'none listed'}; "
        "rerun `python -m alexnet_jax.prepare` to finish them"
      )
    splits.append(
      Shards(files, info["splits"][name]["num_images"], tuple(info["classes"]), info["image_side"])
    )
  return splits[0], splits[1]


def load_stats(
  data_dir: str, side: int, channel_mean: Sequence[float], per_pixel: bool = True
) -> Stats:
  """data_dir/stats.npz when `prepare` wrote one, else the ImageNet constants.

  per_pixel: subtract the mean image (the paper); otherwise its per-channel mean. Without
  statistics, the mean image is `channel_mean` everywhere.
  """
  path = os.path.join(data_dir or "", SHARD_STATS)
  if data_dir and os.path.exists(path):
    with np.load(path) as f:
      mean_image, eigval, eigvec = f["mean_image"], f["eigval"], f["eigvec"]
    if mean_image.shape != (side, side, 3):
      raise UserInputError(
        f"{path} holds a {mean_image.shape[0]}-pixel mean image but resize_size={side}; "
        f"set --config.resize_size={mean_image.shape[0]}"
      )
  else:
    mean_image = np.broadcast_to(np.asarray(channel_mean, np.float32), (side, side, 3))
    eigval, eigvec = np.asarray(IMAGENET_EIGVAL), np.asarray(IMAGENET_EIGVEC)
  if not per_pixel:
    mean_image = np.broadcast_to(mean_image.reshape(-1, 3).mean(0), (side, side, 3))
  return Stats(
    np.asarray(mean_image, np.float32),
    np.asarray(eigval, np.float32),
    np.asarray(eigvec, np.float32),
  )


def save_stats(directory: str, stats: Stats) -> None:
  """Writes stats where `load_stats(directory, ...)` finds them (a run keeps the statistics it
  trained with beside its checkpoints, so its features can be extracted away from its data)."""
  with files.atomic_path(os.path.join(directory, SHARD_STATS)) as tmp:
    np.savez(tmp, mean_image=stats.mean_image, eigval=stats.eigval, eigvec=stats.eigvec)


def image_stats(images: Iterable[np.ndarray]) -> dict:
  """The per-pixel mean image of same-sized uint8 images (0-255) and the eigen-decomposition
  of their RGB covariance (pixels in [0, 1]), eigenvalues descending: what `load_stats` reads."""
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
  return {
    "mean_image": mean_image.astype(np.float32),
    "eigval": eigval[order].astype(np.float32),
    "eigvec": eigvec[:, order].astype(np.float32),
    "num_images": np.int64(count),
  }


def rescaled_sample(
  split: Split | Records, resize_size: int, count: int, num_parallel_calls: int = -1
) -> Iterator[np.ndarray]:
  """`count` images spread evenly over the split, rescaled as training sees them (shorter side
  to resize_size, central square); unreadable ones left out."""
  picks = np.unique(np.linspace(0, len(split) - 1, min(count, len(split))).astype(np.int64))
  ds = _decoded(tf.data.Dataset.from_tensor_slices(picks), split, lambda i: i, num_parallel_calls)
  ds = ds.filter(lambda i, pixels, label, readable: readable)
  ds = ds.map(lambda i, pixels, label, readable: _rescale(pixels, resize_size))
  return numpy_iterator(ds.prefetch(2))


def _side(split: Split | Shards | RawShards | Records, resize_size: int) -> int:
  return split.side if isinstance(split, (Shards, RawShards)) else resize_size


def readers(split: Shards):
  """(whole(i) -> (side x side uint8 image, label), window(i, y, x, size) -> (uint8 crop, label))
  of prepared shards: read by index (random access), the crop fused into the JPEG decode.
  (Folder images go through `_decoded`, which catches unreadable files.)"""
  from array_record.python.array_record_data_source import ArrayRecordDataSource

  source = ArrayRecordDataSource(list(split.files))

  def record(i):
    raw = tf.numpy_function(lambda j: source[int(j)], [i], tf.string, stateful=False)
    example = tf.io.parse_single_example(tf.reshape(raw, []), _FEATURES)
    return example["image"], tf.cast(example["label"], tf.int32)

  def whole(i):
    jpeg, label = record(i)
    image = tf.io.decode_jpeg(jpeg, channels=3)
    image.set_shape((split.side, split.side, 3))
    return image, label

  def window(i, y, x, size):
    """The crop's pixels exactly as a full decode gives them: the fused decode treats its
    window's left and right edges as the image's (chroma upsampling has no neighbour
    there), so it decodes a column more on the left and a few on the right, then slices."""
    jpeg, label = record(i)
    left = tf.minimum(x, 1)
    width = tf.minimum(left + size + 8, split.side - x + left)
    box = tf.stack([y, x - left, size, width])
    image = tf.io.decode_and_crop_jpeg(jpeg, box, channels=3)[:, left : left + size]
    image.set_shape((size, size, 3))
    return image, label

  return whole, window


# Consecutive unreadable training images before the stream gives up. With a fraction f of the
# images unreadable, a shuffled stream holds such a run with probability about f**1000 at any
# point: never, unless nearly all are; and 1000 failed reads take about a second.
MAX_UNREADABLE_RUN = 1000
_UNREADABLE = tf.zeros([1, 1, 3], tf.uint8)  # rescales to a zero image


def _decoded(
  ds: tf.data.Dataset, split: Split | Records, index_of, parallel: int
) -> tf.data.Dataset:
  """Elements e become (*e, pixels, label, readable): the decoded pixels and the label of
  image index_of(*e) of the split, or a placeholder and readable=False where reading or
  decoding it fails (a folder's label still, a record's 0).

  Only that one step's errors are caught (a missing, unreadable or corrupt file or record);
  any other error, a bug, still raises. Each element gets a one-element dataset whose error,
  if any, `ignore_errors` turns into the fallback that follows it; the interleave keeps
  the order and decodes in parallel.
  """
  read_index, label_of = encoded_reader(split)

  def read(*element):
    encoded, label = read_index(index_of(*element))
    return (*element, decode(encoded), label, True)

  def attempt(*element):
    ok = tf.data.Dataset.from_tensors(element).map(read)
    failed = tf.data.Dataset.from_tensors(
      (*element, _UNREADABLE, label_of(index_of(*element)), False)
    )
    return ok.ignore_errors(log_warning=True).concatenate(failed).take(1)

  return ds.interleave(attempt, num_parallel_calls=parallel, deterministic=True)


def numpy_iterator(ds: tf.data.Dataset) -> Iterator:
  """ds's elements as numpy arrays, with tf.data's autotuning off.

  Autotuning's optimisation thread sleeps up to a minute between rounds, and deleting the
  iterator waits for it to wake (TF 2.21): each training run ended with up to a minute of
  nothing. Without it, maps and interleaves given -1 run one call per core, measured as fast
  here (the same images/s, image folders and shards)."""
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.with_options(options).as_numpy_iterator()


def _crop(image: tf.Tensor, y, x, size: int) -> tf.Tensor:
  return tf.ensure_shape(image[y : y + size, x : x + size], (size, size, 3))


def pca_colour(alpha: tf.Tensor, stats: Stats) -> tf.Tensor:
  """The paper's colour noise [p1 p2 p3][a1 l1, a2 l2, a3 l3]^T for (..., 3) alphas, in 0-255
  units."""
  return 255.0 * tf.linalg.matvec(tf.constant(stats.eigvec), alpha * tf.constant(stats.eigval))


def train_batches(
  split: Split | Shards | RawShards | Records,
  *,
  batch_size: int,
  image_size: int,
  resize_size: int,
  stats: Stats,
  seed: int,
  pca_std: float = 0.1,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  num_parallel_calls: int = -1,
) -> Iterator[dict]:
  """Endless training batches for this process.

  Each batch holds the random image_size crops of the side x side images as uint8
  ('image'), their 'label', and the rest of the augmentation drawn here: the crop's
  'offset' (y, x), its horizontal 'flip', and its PCA 'colour' noise (alpha ~ N(0, pca_std)
  per image per presentation, in 0-255 units). `augment.normalize` applies these on the
  device: subtracting the mean image at the crop's position, adding the colour, flipping,
  fused into the train step, where they cost nothing beside the convolutions; in tf.data
  those float passes over every pixel cost more than the JPEG decode itself.

  batch_size is this process's share of the global batch: process i takes rows
  [i * batch_size, (i + 1) * batch_size) of every global batch, so the processes read
  disjoint, equal shares that cover the split once per epoch. Starting at `start_step`
  resumes the stream exactly where a run that did `start_step` steps left it.
  """
  n, side = len(split), _side(split, resize_size)
  global_batch = batch_size * process_count
  steps = n // global_batch  # per epoch; the remainder of each permutation is dropped
  if steps < 1:
    raise UserInputError(
      f"the train split has {n} images, fewer than one global batch of {global_batch}; "
      "lower --config.batch_size or add images"
    )
  seed = tf.constant(seed, tf.int64)
  mine = (
    tf.range(steps, dtype=tf.int64)[:, None] * global_batch
    + process_index * batch_size
    + tf.range(batch_size, dtype=tf.int64)[None, :]
  )
  mine = tf.reshape(mine, [-1])  # this process's rows of every global batch of an epoch

  def draws(e):
    """Epoch e's permutation and random draws (index, offset, flip, colour), made for the
    whole split at once and then cut by position: any process count sees the same global
    batches."""
    perm = tf.random.experimental.stateless_shuffle(
      tf.range(n, dtype=tf.int64), seed=tf.stack([seed, e])
    )
    s = tf.unstack(tf.random.experimental.stateless_split(tf.stack([seed, e]), 4))
    y = tf.random.stateless_uniform([n], s[0], 0, side - image_size + 1, tf.int32)
    x = tf.random.stateless_uniform([n], s[1], 0, side - image_size + 1, tf.int32)
    flip = tf.random.stateless_uniform([n], s[2]) < 0.5
    colour = pca_colour(pca_std * tf.random.stateless_normal([n, 3], s[3]), stats)
    pick = lambda a: tf.gather(a, mine)
    return pick(perm), pick(tf.stack([y, x], 1)), pick(flip), pick(colour)

  per_epoch = steps * batch_size
  first = start_step * batch_size
  if isinstance(split, RawShards):
    return SkipCounter(
      _raw_train(split, draws, per_epoch, first, batch_size, image_size, num_parallel_calls),
      first,
      split,
    )

  def epoch(e):
    return tf.data.Dataset.from_tensor_slices(draws(e))

  def element(ordinal, drawn, crop, label):
    _, offset, flip, colour = drawn
    return {
      "image": crop,
      "label": label,
      "offset": offset,
      "flip": flip,
      "colour": colour,
      "ordinal": ordinal,
    }

  ds = (
    tf.data.Dataset.range(first // per_epoch, 1 << 40)
    .flat_map(epoch)
    .skip(first % per_epoch)
    .enumerate(first)
  )
  parallel = dict(num_parallel_calls=num_parallel_calls, deterministic=True)
  if isinstance(split, Shards):  # `prepare` wrote only images it could read: nothing to catch
    _, window = readers(split)

    def load(ordinal, drawn):
      index, offset, _, _ = drawn
      return element(ordinal, drawn, *window(index, offset[0], offset[1], image_size))

    ds = ds.map(load, **parallel)
  else:

    def load(ordinal, drawn, pixels, label, readable):
      index, offset, _, _ = drawn
      crop = _crop(_rescale(pixels, resize_size), offset[0], offset[1], image_size)
      out = element(ordinal, drawn, crop, label)
      return out | {"unreadable": tf.where(readable, tf.constant(-1, tf.int64), index)}

    ds = _decoded(ds, split, lambda ordinal, drawn: drawn[0], num_parallel_calls)
    ds = _drop_unreadable(ds.map(load, **parallel))
  batches = numpy_iterator(ds.batch(batch_size, drop_remainder=True).prefetch(2))
  return SkipCounter(batches, first, split)


def _raw_train(
  split: RawShards, draws, per_epoch: int, first: int, batch_size: int, size: int, threads: int
) -> Iterator[dict]:
  """train_batches' batches from raw shards, without tf.data: the same draws, then each crop
  one strided copy out of the memory-mapped arrays. Batches are made ahead, in order, by
  `threads` threads (-1: one per core): numpy releases the GIL while it copies."""
  images, labels, starts = split.open()
  draws = tf.function(draws)  # a graph, as tf.data runs it (eager kernels differ in the last bit)
  epochs, lock = {}, threading.Lock()

  def drawn(e: int) -> list[np.ndarray]:
    with lock:  # the first thread to need epoch e draws it; the others wait for it
      if e not in epochs:
        epochs[e] = [t.numpy() for t in draws(tf.constant(e, tf.int64))]
        for old in [k for k in epochs if k < e - 1]:
          del epochs[old]
      return epochs[e]

  def make(position: int) -> dict:
    e, k = divmod(position, per_epoch)
    index, offset, flip, colour = (a[k : k + batch_size] for a in drawn(e))
    shard = np.searchsorted(starts, index, side="right") - 1
    row = index - starts[shard]
    batch = np.empty((batch_size, size, size, 3), np.uint8)
    for j, (s, r, (y, x)) in enumerate(zip(shard, row, offset)):
      batch[j] = images[s][r, y : y + size, x : x + size]
    return {
      "image": batch,
      "label": labels[index],
      "offset": offset,
      "flip": flip,
      "colour": colour,
      "ordinal": np.arange(position, position + batch_size, dtype=np.int64),
    }

  threads = threads if threads > 0 else os.cpu_count() or 1
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    ahead = collections.deque(pool.submit(make, first + i * batch_size) for i in range(2 * threads))
    position = first + len(ahead) * batch_size
    while True:
      batch = ahead.popleft().result()
      ahead.append(pool.submit(make, position))
      position += batch_size
      yield batch


def _drop_unreadable(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Drops the elements whose 'unreadable' source index is >= 0, except once
  MAX_UNREADABLE_RUN of them came in a row: from then on they pass, for SkipCounter to
  raise on (a stream that drops everything would otherwise never yield)."""

  def count(run, e):
    run = tf.where(e["unreadable"] < 0, tf.constant(0, tf.int64), run + 1)
    return run, (e, run)

  ds = ds.scan(tf.constant(0, tf.int64), count)
  ds = ds.filter(lambda e, run: (e["unreadable"] < 0) | (run >= MAX_UNREADABLE_RUN))
  return ds.map(lambda e, run: e)


class SkipCounter:
  """Training batches without their stream 'ordinal', counting in `skipped` the images that
  tf.data dropped because they could not be read (the gaps in the ordinals).

  Resuming is exact up to such drops: prepared shards never hold an unreadable image."""

  def __init__(self, batches: Iterator[dict], first: int, split: Split | Shards | Records):
    self._batches, self._next, self._split, self.skipped = batches, first, split, 0

  def __iter__(self) -> "SkipCounter":
    return self

  def __next__(self) -> dict:
    batch = next(self._batches)
    unreadable = batch.pop("unreadable", np.full(1, -1))
    if unreadable.max() >= 0:
      named = [self._split.describe(int(i)) for i in unreadable[unreadable >= 0][:3]]
      raise UserInputError(
        f"{MAX_UNREADABLE_RUN} training images in a row could not be read (e.g. {named}): "
        "replace or remove the corrupt or missing files under data_dir"
      )
    ordinal = batch.pop("ordinal")
    self.skipped += int(ordinal[-1]) + 1 - self._next - len(ordinal)
    self._next = int(ordinal[-1]) + 1
    return batch


def eval_windows(side: int, size: int, crops: int) -> list[tuple[int, int, bool]]:
  """(y, x, flipped) of the evaluation patches: the centre, or the paper's ten (four
  corners and the centre, and their reflections)."""
  c, far = (side - size) // 2, side - size
  if crops == 1:
    return [(c, c, False)]
  if crops == 10:
    five = [(0, 0), (0, far), (far, 0), (far, far), (c, c)]
    return [(y, x, False) for y, x in five] + [(y, x, True) for y, x in five]
  raise UserInputError(f"eval_crops={crops}; use 1 (centre) or 10 (the paper's ten patches)")


def eval_batches(
  split: Split | Shards | RawShards | Records,
  *,
  batch_size: int,
  image_size: int,
  resize_size: int,
  crops: int = 1,
  process_index: int = 0,
  process_count: int = 1,
  num_parallel_calls: int = -1,
) -> Iterator[dict]:
  """The whole split once, padded to full batches; 'mask' is 0 on padding and on the images
  that could not be read (zeros in 'image'), counted in the iterator's `skipped`.

  'image' is uint8 (batch, H, W, 3) for one crop, (batch, 10, H, W, 3) for ten, with each
  patch's 'offset' and 'flip' for `augment.normalize`. Every process yields the same
  number of batches (its share, padded), so that all of them step together; together the
  unpadded images cover the split exactly once.
  """
  n, side = len(split), _side(split, resize_size)
  windows = eval_windows(side, image_size, crops)
  per_host = -(-n // process_count)
  num_batches = max(1, -(-per_host // batch_size))
  index = np.arange(process_index * per_host, process_index * per_host + num_batches * batch_size)
  mask = (index < min(n, (process_index + 1) * per_host)).astype(np.float32)
  index = np.where(mask > 0, index, 0)
  offsets = tf.constant([[y, x] for y, x, _ in windows], tf.int32)
  flips = tf.constant([f for _, _, f in windows])

  def element(patches, label, m):
    one = len(patches) == 1
    return {
      "image": patches[0] if one else tf.stack(patches),
      "label": label,
      "offset": offsets[0] if one else offsets,
      "flip": flips[0] if one else flips,
      "mask": m,
    }

  if isinstance(split, RawShards):
    raw = _raw_eval(split, index, mask, windows, image_size, batch_size)
    return UnreadableCounter(raw, mask)
  ds = tf.data.Dataset.from_tensor_slices((index, mask))
  if isinstance(split, Shards):  # `prepare` wrote only images it could read: nothing to catch
    whole, window = readers(split)

    def load(i, m):
      if len(windows) == 1:  # the crop fused into the JPEG decode
        ((y, x, _),) = windows
        crop, label = window(i, y, x, image_size)
        return element([crop], label, m)
      image, label = whole(i)
      return element([_crop(image, y, x, image_size) for y, x, _ in windows], label, m)
  else:

    def load(i, m, pixels, label, readable):
      image = _rescale(pixels, resize_size)
      patches = [_crop(image, y, x, image_size) for y, x, _ in windows]
      return element(patches, label, m * tf.cast(readable, tf.float32))

    ds = _decoded(ds, split, lambda i, m: i, num_parallel_calls)
  ds = ds.map(load, num_parallel_calls=num_parallel_calls, deterministic=True)
  return UnreadableCounter(numpy_iterator(ds.batch(batch_size).prefetch(2)), mask)


def _raw_eval(
  split: RawShards,
  index: np.ndarray,
  mask: np.ndarray,
  windows: list[tuple[int, int, bool]],
  size: int,
  batch_size: int,
) -> Iterator[dict]:
  """eval_batches' batches from raw shards: the same patches, copied out of the arrays."""
  images, labels, starts = split.open()
  offsets = np.asarray([[y, x] for y, x, _ in windows], np.int32)
  flips = np.asarray([f for _, _, f in windows])
  for b in range(0, len(index), batch_size):
    rows = index[b : b + batch_size]
    shard = np.searchsorted(starts, rows, side="right") - 1
    patches = np.stack(
      [
        [images[s][r - starts[s], y : y + size, x : x + size] for y, x in offsets]
        for s, r in zip(shard, rows)
      ]
    )
    one = len(windows) == 1
    yield {
      "image": patches[:, 0] if one else patches,
      "label": labels[rows],
      "offset": np.broadcast_to(offsets[0] if one else offsets, (len(rows), *offsets.shape[one:])),
      "flip": np.broadcast_to(flips[0] if one else flips, (len(rows), *flips.shape[one:])),
      "mask": mask[b : b + batch_size],
    }


class UnreadableCounter:
  """Evaluation batches, counting in `skipped` the images masked out because they could not
  be read: those of the batches yielded so far, so all of them once the iterator is done."""

  def __init__(self, batches: Iterator[dict], mask: np.ndarray):
    self._batches, self._mask, self._seen, self.skipped = batches, mask, 0, 0

  def __iter__(self) -> "UnreadableCounter":
    return self

  def __next__(self) -> dict:
    batch = next(self._batches)
    mask = batch["mask"]
    expected = self._mask[self._seen : self._seen + len(mask)]
    self._seen += len(mask)
    self.skipped += int(np.sum(expected > 0) - np.sum(mask > 0))
    return batch
