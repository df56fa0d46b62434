"""Decoding in tf.data graphs: only a failed read or decode is caught, and the crop fused
into a prepared JPEG's decode gives exactly the pixels of the full decode."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import jpeg

from alexnet_jax.data import batches, decoding, sources


def test_errors_other_than_unreadable_files_are_raised(mixed_folder, monkeypatch):
  """A failure after the decode is a bug, not a bad file: the stream must not swallow it."""
  train, _ = sources.read_image_folder(mixed_folder)
  monkeypatch.setattr(tf.image, "resize_with_crop_or_pad", lambda x, h, w: tf.reshape(x, [h, w, 3]))
  with pytest.raises(tf.errors.InvalidArgumentError):
    next(batches.eval_batches(train, batch_size=2, image_size=24, resize_size=32))


def test_the_fused_crop_is_the_full_decode_cropped():
  """Chroma upsampling at the window's edges is the image's own, at every offset: the left
  and right edges of the image and windows inside it."""
  side, size = 64, 40
  encoded = tf.constant(jpeg(0, size=(side, side)))
  reader = decoding.PreparedJpeg(lambda i: (encoded, tf.constant(0, tf.int32)), side)
  whole = reader.decoded(tf.constant(0))[0].numpy()
  for y, x in [(0, 0), (0, 1), (3, 7), (17, 13), (side - size, side - size)]:
    window, _ = reader.window(tf.constant(0), y, x, size)
    np.testing.assert_array_equal(window.numpy(), whole[y : y + size, x : x + size])
