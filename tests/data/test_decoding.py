"""Decoding in tf.data graphs: only a failed read or decode is caught, and the crop fused
into a prepared JPEG's decode gives exactly the pixels of the full decode."""

import io
import resource
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf
from conftest import jpeg, write_image
from PIL import Image

from alexnet_jax.data import batches, decoding, image_files, sources


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


def one_colour_png(width: int, height: int) -> bytes:
  """A valid grayscale PNG of any size, written row by row: a 20000x20000 one is ~400 KB on
  disk and 1.2 GB decoded to RGB."""
  deflate, data = zlib.compressobj(9), []
  row = bytes(width + 1)  # filter byte 0, then the pixels
  for _ in range(height):
    data.append(deflate.compress(row))
  data.append(deflate.flush())

  def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

  header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  return (
    b"\x89PNG\r\n\x1a\n"
    + chunk(b"IHDR", header)
    + chunk(b"IDAT", b"".join(data))
    + chunk(b"IEND", b"")
  )


def test_the_header_gives_the_pixel_count_without_decoding(tmp_path):
  images = {"RGB": "JPEG", "L": "PNG", "P": "GIF", "RGBA": "BMP"}
  for mode, fmt in images.items():
    out = io.BytesIO()
    Image.new(mode, (70, 30)).save(out, fmt)
    assert decoding.declared_pixels(tf.constant(out.getvalue())).numpy() == 2100, fmt
  assert decoding.declared_pixels(tf.constant(one_colour_png(20000, 20))).numpy() == 400_000


@pytest.mark.parametrize("extension", ["png", "jpg"])
def test_an_image_over_the_pixel_limit_is_unreadable_and_counted(tmp_path, monkeypatch, extension):
  """Over the limit (lowered here to 40x40), an image is skipped and counted as a corrupt
  one is, in evaluation and in training; at the limit it is read."""
  root = tmp_path / "data"
  for split in ("train", "val"):
    write_image(str(root / f"{split}/cat/small.{extension}"), "RGB", (40, 40), 50)
    write_image(str(root / f"{split}/cat/large.{extension}"), "RGB", (41, 40), 50)
  monkeypatch.setattr(image_files, "MAX_PIXELS", 40 * 40, raising=False)
  train, val = sources.read_image_folder(str(root))
  it = batches.eval_batches(val, batch_size=2, image_size=24, resize_size=32)
  batch = next(it)
  assert it.skipped == 1 and batch["mask"].tolist() == [0, 1]  # large, small
  stream = batches.train_batches(
    train, batch_size=2, image_size=24, resize_size=32, stats=stats_of(32), seed=0
  )
  next(stream)
  assert stream.skipped >= 1


def stats_of(side: int):
  from alexnet_jax.data.stats import load_stats

  return load_stats("", side, (0.0, 0.0, 0.0))


def test_a_small_file_declaring_a_huge_image_is_never_decoded(tmp_path):
  """A 20000x20000 PNG of one colour, a few hundred KB: skipped and counted under PIL's own
  limit, and the process's peak memory does not grow by the 1.2 GB its pixels would take."""
  root = tmp_path / "data"
  (root / "val/cat").mkdir(parents=True)
  (root / "val/cat/huge.png").write_bytes(one_colour_png(20000, 20000))
  write_image(str(root / "val/cat/small.png"), "RGB", (40, 40), 50)
  assert (root / "val/cat/huge.png").stat().st_size < 1_000_000
  val = sources.read_split(str(root), "val")
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
  it = batches.eval_batches(val, batch_size=2, image_size=24, resize_size=32)
  batch = next(it)
  assert it.skipped == 1 and batch["mask"].tolist() == [0, 1]
  assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 300_000
