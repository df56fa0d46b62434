"""How a source's images become pixels in tf.data graphs, in the two ways sources store them.

`Decoded`: encoded images of any size (image files, TFDS records), decoded and rescaled as
they are read, where an image that cannot be read or decoded, or whose header declares more
pixels than `image_files.MAX_PIXELS`, is caught and stands as a placeholder marked
unreadable. `PreparedJpeg`: the side x side JPEGs `prepare` wrote (only images it could read:
nothing to catch), the crop fused into the decode. Both give a stream's
elements their crops (`crops`), so the streams never ask which they read.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Callable, Protocol, Sequence

import numpy as np
import tensorflow as tf
from PIL import Image

from alexnet_jax.data import image_files

tf.config.set_visible_devices([], "GPU")  # TensorFlow never takes an accelerator from JAX

_UNREADABLE = tf.zeros([1, 1, 3], tf.uint8)  # rescales to a zero image


@dataclasses.dataclass(frozen=True)
class Crops:
  """What a stream asks a reader for each element e of its dataset: the size x size crops at
  offsets_of(*e) (a list of (y, x)) of image index_of(*e), an image of any size rescaled to
  resize_size first; finish(*e, crops, label, readable) is what the stream gets for e.
  `parallel` elements are read at a time (-1: one per core), kept in order."""

  index_of: Callable
  offsets_of: Callable
  size: int
  resize_size: int
  parallel: int
  finish: Callable


class GraphReader(Protocol):
  """Reads a source's images by index in tf.data graphs."""

  fallible: bool  # whether an image may fail to read (then `crops` marks it unreadable)

  def decoded(self, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(the image's pixels as stored, its int32 label): the decode, nothing else."""

  def crops(self, ds: tf.data.Dataset, want: Crops) -> tf.data.Dataset:
    """ds's elements e become want.finish(*e, crops, label, readable)."""


def decode(encoded: tf.Tensor) -> tf.Tensor:
  """An encoded image's pixels as (H, W, 3) uint8 (grayscale, CMYK and RGBA become RGB).

  An image whose header declares more than `image_files.MAX_PIXELS` pixels fails before it is
  decoded (an error as for a corrupt file: the streams count it unreadable), so a small file
  that declares a huge image never takes gigabytes."""
  limit = tf.constant(image_files.MAX_PIXELS, tf.int64)
  small = tf.debugging.assert_less_equal(
    declared_pixels(encoded), limit, message="more pixels than image_files.MAX_PIXELS"
  )
  with tf.control_dependencies([small]):
    return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def declared_pixels(encoded: tf.Tensor) -> tf.Tensor:
  """The pixel count (int64) an encoded image's header declares, read without decoding: a
  JPEG's frame header and a PNG's IHDR in the graph, another format's header by PIL."""

  def jpeg():
    shape = tf.image.extract_jpeg_shape(encoded, tf.int64)
    return shape[0] * shape[1]

  def png():  # IHDR: width, height as big-endian uint32 at bytes 16-23
    size = tf.cast(tf.io.decode_raw(tf.strings.substr(encoded, 16, 8), tf.uint8), tf.int64)
    width, height = tf.unstack(tf.reduce_sum(tf.reshape(size, [2, 4]) * _BIG_ENDIAN, axis=1))
    return width * height

  def other():
    return tf.reshape(tf.numpy_function(_pil_pixels, [encoded], tf.int64, stateful=False), [])

  return tf.case(
    [
      (tf.strings.substr(encoded, 0, 2) == _JPEG_MAGIC, jpeg),
      (tf.strings.substr(encoded, 0, 8) == _PNG_MAGIC, png),
    ],
    default=other,
  )


_JPEG_MAGIC, _PNG_MAGIC = b"\xff\xd8", b"\x89PNG\r\n\x1a\n"
_BIG_ENDIAN = tf.constant([1 << 24, 1 << 16, 1 << 8, 1], tf.int64)


def _pil_pixels(encoded) -> np.int64:
  """PIL reads only the header here (GIF, BMP, WebP: formats decode_image also reads).
  `encoded`: bytes, or in eager mode a 0-d array of them."""
  width, height = Image.open(io.BytesIO(np.asarray(encoded).item())).size
  return np.int64(width * height)


def rescale(image: tf.Tensor, resize_size: int) -> tf.Tensor:
  """The paper's down-sampling: shorter side to resize_size, then the central square (uint8)."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = resize_size / tf.reduce_min(shape)
  new = tf.cast(tf.math.round(shape * scale), tf.int32)
  new = tf.maximum(new, resize_size)
  image = tf.image.resize(image, new, method="bilinear", antialias=True)
  image = tf.image.resize_with_crop_or_pad(image, resize_size, resize_size)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def crop(image: tf.Tensor, y, x, size: int) -> tf.Tensor:
  return tf.ensure_shape(image[y : y + size, x : x + size], (size, size, 3))


@dataclasses.dataclass(frozen=True)
class Decoded:
  """Encoded images of any size: read(index) -> (encoded image, int32 label) is the step that
  fails on a missing, unreadable or corrupt file or record; label_of(index) is the label an
  unreadable image keeps (what a folder's file names without reading it)."""

  read: Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]
  label_of: Callable[[tf.Tensor], tf.Tensor]
  fallible = True

  def decoded(self, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    encoded, label = self.read(index)
    return decode(encoded), label

  def crops(self, ds: tf.data.Dataset, want: Crops) -> tf.data.Dataset:
    def load(*args):
      *element, pixels, label, readable = args
      image = rescale(pixels, want.resize_size)
      patches = [crop(image, y, x, want.size) for y, x in want.offsets_of(*element)]
      return want.finish(*element, patches, label, readable)

    ds = self._attempted(ds, want.index_of, want.parallel)
    return ds.map(load, num_parallel_calls=want.parallel, deterministic=True)

  def _attempted(self, ds: tf.data.Dataset, index_of: Callable, parallel: int) -> tf.data.Dataset:
    """Elements e become (*e, pixels, label, readable): the decoded pixels and the label of
    image index_of(*e), or a placeholder, label_of's label and readable=False where reading
    or decoding it fails.

    Only that one step's errors are caught (a missing, unreadable or corrupt file or record);
    any other error, a bug, still raises. Each element gets a one-element dataset whose error,
    if any, `ignore_errors` turns into the fallback that follows it; the interleave keeps
    the order and decodes in parallel.
    """

    def read_element(*element):
      return (*element, *self.decoded(index_of(*element)), True)

    def attempt(*element):
      ok = tf.data.Dataset.from_tensors(element).map(read_element)
      failed = tf.data.Dataset.from_tensors(
        (*element, _UNREADABLE, self.label_of(index_of(*element)), False)
      )
      return ok.ignore_errors(log_warning=True).concatenate(failed).take(1)

    return ds.interleave(attempt, num_parallel_calls=parallel, deterministic=True)


@dataclasses.dataclass(frozen=True)
class PreparedJpeg:
  """side x side JPEGs read by index: read(index) -> (JPEG, int32 label)."""

  read: Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]
  side: int
  fallible = False

  def decoded(self, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    jpeg, label = self.read(index)
    image = tf.io.decode_jpeg(jpeg, channels=3)
    image.set_shape((self.side, self.side, 3))
    return image, label

  def window(self, index: tf.Tensor, y, x, size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """The crop's pixels exactly as a full decode gives them: the fused decode treats its
    window's left and right edges as the image's (chroma upsampling has no neighbour
    there), so it decodes a column more on the left and a few on the right, then slices."""
    jpeg, label = self.read(index)
    left = tf.minimum(x, 1)
    width = tf.minimum(left + size + 8, self.side - x + left)
    box = tf.stack([y, x - left, size, width])
    image = tf.io.decode_and_crop_jpeg(jpeg, box, channels=3)[:, left : left + size]
    image.set_shape((size, size, 3))
    return image, label

  def crops(self, ds: tf.data.Dataset, want: Crops) -> tf.data.Dataset:
    """Stored at their side: resize_size is theirs."""

    def load(*element):
      index, offsets, size = want.index_of(*element), want.offsets_of(*element), want.size
      if len(offsets) == 1:  # the crop fused into the JPEG decode
        ((y, x),) = offsets
        patch, label = self.window(index, y, x, size)
        return want.finish(*element, [patch], label, tf.constant(True))
      image, label = self.decoded(index)
      patches = [crop(image, y, x, size) for y, x in offsets]
      return want.finish(*element, patches, label, tf.constant(True))

    return ds.map(load, num_parallel_calls=want.parallel, deterministic=True)


def example_reader(
  records: Sequence[bytes], image_key: str, label_key: str
) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
  """read(index) -> (encoded image, int32 label) of serialized tf.Examples read by index."""
  features = {
    image_key: tf.io.FixedLenFeature([], tf.string),
    label_key: tf.io.FixedLenFeature([], tf.int64),
  }

  def read(index):
    raw = tf.numpy_function(lambda j: records[int(j)], [index], tf.string, stateful=False)
    example = tf.io.parse_single_example(tf.reshape(raw, []), features)
    return example[image_key], tf.cast(example[label_key], tf.int32)

  return read
