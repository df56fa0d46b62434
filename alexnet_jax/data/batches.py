"""The batch streams of training and evaluation, and the paper's crops, flips and colour noise.

Training order is a pure function of (seed, epoch): every epoch is a fresh global
permutation of the split, cut into equal disjoint shares, one per process, and every
image's crop and flip are drawn from (seed, its position in the stream). A run restarted
at step s therefore sees exactly the batches it would have seen. An image that cannot be
read is skipped in training and masked out in evaluation, and counted in both. What to read
in which order is decided here, the same for every source; the source only says how its
images are read (`sources.Source.read`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import threading
from typing import Callable, Iterator, NamedTuple

import numpy as np
import tensorflow as tf

from alexnet_jax.core.errors import UserInputError
from alexnet_jax.data.decoding import Crops, GraphReader
from alexnet_jax.data.sources import RawArrays, Source
from alexnet_jax.data.stats import Stats

# Consecutive unreadable training images before the stream gives up. With a fraction f of the
# images unreadable, a shuffled stream holds such a run with probability about f**1000 at any
# point: never, unless nearly all are; and 1000 failed reads take about a second.
MAX_UNREADABLE_RUN = 1000


def numpy_iterator(ds: tf.data.Dataset) -> Iterator:
  """ds's elements as numpy arrays, with tf.data's autotuning off.

  Autotuning's optimisation thread sleeps up to a minute between rounds, and deleting the
  iterator waits for it to wake (TF 2.21): each training run ended with up to a minute of
  nothing. Without it, maps and interleaves given -1 run one call per core, measured as fast
  here (the same images/s, image folders and shards)."""
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.with_options(options).as_numpy_iterator()


def pca_colour(alpha: tf.Tensor, stats: Stats) -> tf.Tensor:
  """The paper's colour noise [p1 p2 p3][a1 l1, a2 l2, a3 l3]^T for (..., 3) alphas, in 0-255
  units."""
  return 255.0 * tf.linalg.matvec(tf.constant(stats.eigvec), alpha * tf.constant(stats.eigval))


def train_batches(
  split: Source,
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
) -> SkipCounter:
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
  n, side = len(split), split.side or resize_size
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

  first = start_step * batch_size
  stream = _Training(
    draws, steps * batch_size, first, batch_size, image_size, resize_size, num_parallel_calls
  )
  return SkipCounter(split.read(stream), first, split)


@dataclasses.dataclass(frozen=True)
class _Training:
  """train_batches' stream from position `first` on: batches with each image's stream
  'ordinal', and in a graph stream that may fail to read, the 'unreadable' source index."""

  draws: Callable  # epoch -> (index, offset, flip, colour) of this process's images
  per_epoch: int
  first: int
  batch_size: int
  size: int
  resize_size: int
  parallel: int

  def graph(self, reader: GraphReader) -> Iterator[dict]:
    def finish(ordinal, drawn, patches, label, readable):
      index, offset, flip, colour = drawn
      out = {
        "image": patches[0],
        "label": label,
        "offset": offset,
        "flip": flip,
        "colour": colour,
        "ordinal": ordinal,
      }
      if reader.fallible:
        out["unreadable"] = tf.where(readable, tf.constant(-1, tf.int64), index)
      return out

    ds = (
      tf.data.Dataset.range(self.first // self.per_epoch, 1 << 40)
      .flat_map(lambda e: tf.data.Dataset.from_tensor_slices(self.draws(e)))
      .skip(self.first % self.per_epoch)
      .enumerate(self.first)
    )
    index_of = lambda ordinal, drawn: drawn[0]
    offsets_of = lambda ordinal, drawn: [(drawn[1][0], drawn[1][1])]
    ds = reader.crops(
      ds, Crops(index_of, offsets_of, self.size, self.resize_size, self.parallel, finish)
    )
    if reader.fallible:
      ds = _drop_unreadable(ds)
    return numpy_iterator(ds.batch(self.batch_size, drop_remainder=True).prefetch(2))

  def arrays(self, arrays: RawArrays) -> Iterator[dict]:
    """The same draws, then each crop one strided copy out of the arrays, without tf.data.
    Batches are made ahead, in order, by `parallel` threads (-1: one per core)."""
    draws = tf.function(self.draws)  # a graph, as tf.data runs it: eager kernels differ
    epochs, lock = {}, threading.Lock()

    def drawn(e: int) -> list[np.ndarray]:
      with lock:  # the first thread to need epoch e draws it; the others wait for it
        if e not in epochs:
          epochs[e] = [t.numpy() for t in draws(tf.constant(e, tf.int64))]
          for old in [k for k in epochs if k < e - 1]:
            del epochs[old]
        return epochs[e]

    def make(position: int) -> dict:
      e, k = divmod(position, self.per_epoch)
      index, offset, flip, colour = (a[k : k + self.batch_size] for a in drawn(e))
      return {
        "image": arrays.patches(index, offset[:, None], self.size)[:, 0],
        "label": arrays.labels[index],
        "offset": offset,
        "flip": flip,
        "colour": colour,
        "ordinal": np.arange(position, position + self.batch_size, dtype=np.int64),
      }

    threads = self.parallel if self.parallel > 0 else os.cpu_count() or 1
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      size = self.batch_size
      ahead = collections.deque(
        pool.submit(make, self.first + i * size) for i in range(2 * threads)
      )
      position = self.first + len(ahead) * size
      while True:
        batch = ahead.popleft().result()
        ahead.append(pool.submit(make, position))
        position += size
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
  were dropped because they could not be read (the gaps in the ordinals).

  Resuming is exact up to such drops: prepared shards never hold an unreadable image."""

  def __init__(self, batches: Iterator[dict], first: int, split: Source):
    self._batches, self._next, self._split, self.skipped = batches, first, split, 0

  def __iter__(self) -> SkipCounter:
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


class Window(NamedTuple):
  """An evaluation patch: its top-left corner and whether it is reflected."""

  y: int
  x: int
  flipped: bool


def eval_windows(side: int, size: int, crops: int) -> list[Window]:
  """The evaluation patches: the centre, or the paper's ten (four corners and the centre,
  and their reflections)."""
  c, far = (side - size) // 2, side - size
  if crops == 1:
    return [Window(c, c, False)]
  if crops == 10:
    five = [(0, 0), (0, far), (far, 0), (far, far), (c, c)]
    return [Window(y, x, False) for y, x in five] + [Window(y, x, True) for y, x in five]
  raise UserInputError(f"eval_crops={crops}; use 1 (centre) or 10 (the paper's ten patches)")


def eval_batches(
  split: Source,
  *,
  batch_size: int,
  image_size: int,
  resize_size: int,
  crops: int = 1,
  process_index: int = 0,
  process_count: int = 1,
  num_parallel_calls: int = -1,
) -> UnreadableCounter:
  """The whole split once, padded to full batches; 'mask' is 0 on padding and on the images
  that could not be read (zeros in 'image'), counted in the iterator's `skipped`.

  'image' is uint8 (batch, H, W, 3) for one crop, (batch, 10, H, W, 3) for ten, with each
  patch's 'offset' and 'flip' for `augment.normalize`. Every process yields the same
  number of batches (its share, padded), so that all of them step together; together the
  unpadded images cover the split exactly once.
  """
  n, side = len(split), split.side or resize_size
  windows = eval_windows(side, image_size, crops)
  per_host = -(-n // process_count)
  num_batches = max(1, -(-per_host // batch_size))
  index = np.arange(process_index * per_host, process_index * per_host + num_batches * batch_size)
  mask = (index < min(n, (process_index + 1) * per_host)).astype(np.float32)
  index = np.where(mask > 0, index, 0)
  stream = _Evaluation(
    index, mask, windows, image_size, resize_size, batch_size, num_parallel_calls
  )
  return UnreadableCounter(split.read(stream), mask)


@dataclasses.dataclass(frozen=True)
class _Evaluation:
  """eval_batches' stream: images `index` in order, with their padding `mask`."""

  index: np.ndarray
  mask: np.ndarray
  windows: list[Window]
  size: int
  resize_size: int
  batch_size: int
  parallel: int

  def graph(self, reader: GraphReader) -> Iterator[dict]:
    offsets = tf.constant([[w.y, w.x] for w in self.windows], tf.int32)
    flips = tf.constant([w.flipped for w in self.windows])
    one = len(self.windows) == 1

    def finish(i, m, patches, label, readable):
      return {
        "image": patches[0] if one else tf.stack(patches),
        "label": label,
        "offset": offsets[0] if one else offsets,
        "flip": flips[0] if one else flips,
        "mask": m * tf.cast(readable, tf.float32),
      }

    ds = tf.data.Dataset.from_tensor_slices((self.index, self.mask))
    corners = [(w.y, w.x) for w in self.windows]

    # Named, not lambdas on one line: AutoGraph cannot tell such lambdas apart and warns.
    def index_of(i, m):
      return i

    def corners_of(i, m):
      return corners

    want = Crops(index_of, corners_of, self.size, self.resize_size, self.parallel, finish)
    ds = reader.crops(ds, want)
    return numpy_iterator(ds.batch(self.batch_size).prefetch(2))

  def arrays(self, arrays: RawArrays) -> Iterator[dict]:
    offsets = np.asarray([[w.y, w.x] for w in self.windows], np.int32)
    flips = np.asarray([w.flipped for w in self.windows])
    one = len(self.windows) == 1
    for b in range(0, len(self.index), self.batch_size):
      rows = self.index[b : b + self.batch_size]
      patches = arrays.patches(
        rows, np.broadcast_to(offsets, (len(rows), *offsets.shape)), self.size
      )
      yield {
        "image": patches[:, 0] if one else patches,
        "label": arrays.labels[rows],
        "offset": np.broadcast_to(
          offsets[0] if one else offsets, (len(rows), *offsets.shape[one:])
        ),
        "flip": np.broadcast_to(flips[0] if one else flips, (len(rows), *flips.shape[one:])),
        "mask": self.mask[b : b + self.batch_size],
      }


class UnreadableCounter:
  """Evaluation batches, counting in `skipped` the images masked out because they could not
  be read: those of the batches yielded so far, so all of them once the iterator is done."""

  def __init__(self, batches: Iterator[dict], mask: np.ndarray):
    self._batches, self._mask, self._seen, self.skipped = batches, mask, 0, 0

  def __iter__(self) -> UnreadableCounter:
    return self

  def __next__(self) -> dict:
    batch = next(self._batches)
    mask = batch["mask"]
    expected = self._mask[self._seen : self._seen + len(mask)]
    self._seen += len(mask)
    self.skipped += int(np.sum(expected > 0) - np.sum(mask > 0))
    return batch


def rescaled_sample(
  split: Source, resize_size: int, count: int, num_parallel_calls: int = -1
) -> Iterator[np.ndarray]:
  """`count` images spread evenly over the split, as training sees them before its crops
  (shorter side to resize_size, central square; prepared images as stored); unreadable ones
  left out. What the statistics are computed from."""
  picks = np.unique(np.linspace(0, len(split) - 1, min(count, len(split))).astype(np.int64))
  return split.read(_Sample(picks, split.side or resize_size, num_parallel_calls))


@dataclasses.dataclass(frozen=True)
class _Sample:
  """rescaled_sample's stream: the whole images `picks`, one at a time."""

  picks: np.ndarray
  side: int
  parallel: int

  def graph(self, reader: GraphReader) -> Iterator[np.ndarray]:
    def finish(i, patches, label, readable):
      return patches[0], readable

    def index_of(i):
      return i

    def whole(i):
      return [(0, 0)]

    want = Crops(index_of, whole, self.side, self.side, self.parallel, finish)
    ds = reader.crops(tf.data.Dataset.from_tensor_slices(self.picks), want)
    ds = ds.filter(lambda image, readable: readable).map(lambda image, readable: image)
    return numpy_iterator(ds.prefetch(2))

  def arrays(self, arrays: RawArrays) -> Iterator[np.ndarray]:
    whole = np.zeros((1, 1, 2), np.int64)
    return (arrays.patches(np.asarray([i]), whole, self.side)[0, 0] for i in self.picks)
