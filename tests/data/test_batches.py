"""The batch streams: crops, host shares, padding, determinism, resume, the paper's colour
noise and ten patches, unreadable images skipped or masked and counted."""

import os
import threading

import numpy as np
import pytest
from conftest import write_image
from PIL import Image

from alexnet_jax.core.errors import UserInputError
from alexnet_jax.data import augment, batches, sources
from alexnet_jax.data.stats import Stats, load_stats

ZERO = load_stats("", 32, (0.0, 0.0, 0.0))
ARGS = dict(image_size=24, resize_size=32)
PLAIN = dict(ARGS, stats=ZERO, pca_std=0.0)


def net_input(batch, stats=ZERO):
  """What the train and eval steps feed the network: the device half of the augmentation."""
  return np.asarray(augment.normalize(batch, stats.mean_image))


def test_mean_is_subtracted(mixed_folder):
  train, _ = sources.read_image_folder(mixed_folder)
  stats = load_stats("", 32, (10.0, 20.0, 30.0))
  batch = next(
    batches.train_batches(
      train, batch_size=8, seed=0, image_size=24, resize_size=32, pca_std=0.0, stats=stats
    )
  )
  assert batch["image"].dtype == np.uint8 and net_input(batch, stats).dtype == np.float32
  rgba = net_input(batch, stats)[batch["label"] == 2][0]
  np.testing.assert_allclose(rgba.mean(axis=(0, 1)), [190, 180, 170], atol=1)


def test_eval_covers_the_split_once_with_padding(mixed_folder):
  _, val = sources.read_image_folder(mixed_folder)
  made = list(batches.eval_batches(val, batch_size=2, **ARGS))
  assert len(made) == 2
  assert [b["mask"].tolist() for b in made] == [[1, 1], [1, 0]]
  labels = [y for b in made for y, m in zip(b["label"], b["mask"]) if m]
  assert sorted(labels) == [0, 2, 2]
  # Two processes: equal numbers of batches, disjoint images, the split covered once.
  shares = [
    list(batches.eval_batches(val, batch_size=1, process_index=i, process_count=2, **ARGS))
    for i in range(2)
  ]
  assert len(shares[0]) == len(shares[1]) == 2
  assert sum(float(b["mask"].sum()) for s in shares for b in s) == 3


@pytest.mark.parametrize("crops", [1, 10])
def test_an_unreadable_eval_image_is_masked_out_and_counted(mixed_folder, crops):
  _, val = sources.read_image_folder(mixed_folder)
  clean = list(batches.eval_batches(val, batch_size=2, crops=crops, **ARGS))
  with open(val.paths[1], "wb") as f:
    f.write(b"not an image")
  stream = batches.eval_batches(val, batch_size=2, crops=crops, **ARGS)
  broken = list(stream)
  assert stream.skipped == 1
  assert [b["mask"].tolist() for b in broken] == [[1, 0], [1, 0]]
  assert not broken[0]["image"][1].any()
  for a, b in zip(clean, broken):
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_array_equal(a["image"][b["mask"] > 0], b["image"][b["mask"] > 0])


def first_batch_or_error(stream, timeout=60):
  """next(stream), or the error it raised, within `timeout` s (a stream that hangs fails)."""
  out = []

  def run():
    try:
      out.append(next(stream))
    except Exception as e:
      out.append(e)

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(timeout)
  assert out, f"no batch and no error in {timeout} s"
  return out[0]


def test_unreadable_training_images_are_skipped_but_all_unreadable_is_an_error(tmp_path):
  train = distinct_images(tmp_path)
  (tmp_path / "train/c0/3.png").write_bytes(b"not an image")
  stream = batches.train_batches(train, batch_size=2, seed=3, **PLAIN)
  seen = [s for _ in range(7) for s in origins(next(stream))]
  assert 20 + 25 * 3 not in seen and stream.skipped >= 1  # 14 of 16 ordinals: at least once
  for path in train.paths:
    with open(path, "wb") as f:
      f.write(b"not an image")
  error = first_batch_or_error(batches.train_batches(train, batch_size=2, seed=3, **PLAIN))
  assert isinstance(error, UserInputError), error
  assert "training images in a row could not be read" in str(error) and str(tmp_path) in str(error)


def train_stream(split, steps, **kw):
  it = batches.train_batches(split, batch_size=2, seed=3, **PLAIN, **kw)
  return [next(it) for _ in range(steps)]


def distinct_images(root, count=8):
  """`count` train images, each of its own constant value: a crop's mean names its origin."""
  for i in range(count):
    write_image(str(root / f"train/c{i % 3}/{i}.png"), "RGB", (32 + i, 40), 20 + 25 * i)
  write_image(str(root / "val/c0/v.png"), "RGB", (32, 32), 0)
  return sources.read_image_folder(str(root)).train


def origins(batch):
  return [round(float(img.mean())) for img in batch["image"]]


def test_training_order_is_seeded_disjoint_per_host_and_resumable(tmp_path):
  train = distinct_images(tmp_path)
  a, b = train_stream(train, 8), train_stream(train, 8)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
  # Resuming at step 5 yields exactly the batches 5, 6, 7 of the uninterrupted stream.
  for x, y in zip(a[5:], train_stream(train, 3, start_step=5)):
    np.testing.assert_array_equal(x["image"], y["image"])
  epoch_one = [s for batch in a[:4] for s in origins(batch)]
  assert sorted(epoch_one) == [20 + 25 * i for i in range(8)]  # each image once per epoch

  # Per epoch (4 images per host with 2 hosts), the hosts' shares are disjoint halves of
  # the one-process epoch, in its order.
  def share(pi):
    it = batches.train_batches(
      train, batch_size=2, seed=3, process_index=pi, process_count=2, **PLAIN
    )
    return [s for _ in range(2) for s in origins(next(it))]

  h0, h1 = share(0), share(1)
  assert not set(h0) & set(h1) and sorted(h0 + h1) == sorted(epoch_one)
  assert h0 == epoch_one[0:2] + epoch_one[4:6] and h1 == epoch_one[2:4] + epoch_one[6:8]


def test_augmentation_crops_and_flips_vary(tmp_path):
  root = tmp_path / "d"
  gradient = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 3))
  for split in ("train", "val"):
    os.makedirs(root / split / "x")
    Image.fromarray(gradient).save(root / split / "x" / "g.png")
  train, _ = sources.read_image_folder(str(root))
  stats = load_stats("", 64, (0, 0, 0))
  it = batches.train_batches(
    train, batch_size=1, seed=0, image_size=24, resize_size=64, pca_std=0.0, stats=stats
  )
  crops = {tuple(net_input(next(it), stats)[0, 0, [0, -1], 0].tolist()) for _ in range(12)}
  assert len(crops) > 3  # different offsets
  assert any(a > b for a, b in crops) and any(a < b for a, b in crops)  # both orientations


def constant_folder(root, pixels, copies=1):
  for split in ("train", "val"):
    os.makedirs(root / split / "x", exist_ok=True)
    for i in range(copies):
      Image.fromarray(pixels).save(root / split / "x" / f"{i}.png")
  return sources.read_image_folder(str(root))


def test_pca_noise_has_the_stated_covariance(tmp_path):
  train, _ = constant_folder(tmp_path, np.full((16, 16, 3), 128, np.uint8), copies=50)
  eigvec = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0].astype(np.float32)
  stats = Stats(
    np.full((16, 16, 3), 128, np.float32), np.array([0.2, 0.05, 0.01], np.float32), eigvec
  )
  it = batches.train_batches(
    train, batch_size=50, seed=1, image_size=8, resize_size=16, stats=stats, pca_std=0.1
  )
  noise = np.concatenate(
    [net_input(next(it), stats)[:, 0, 0, :] for _ in range(80)]
  )  # 4000 presentations
  assert noise.shape == (4000, 3)
  expected = 255.0**2 * eigvec @ np.diag((0.1 * stats.eigval) ** 2) @ eigvec.T
  np.testing.assert_allclose(np.cov(noise.T), expected, rtol=0.1, atol=0.02 * expected.max())
  np.testing.assert_allclose(noise.mean(0), 0, atol=0.1 * np.sqrt(expected.max()))
  # One draw per image: every pixel of an image moves by the same colour.
  image = net_input(next(it), stats)[0]
  np.testing.assert_allclose(image, np.broadcast_to(image[0, 0], image.shape), atol=1e-4)


def test_ten_patches_are_the_paper_windows(tmp_path):
  assert batches.eval_windows(256, 227, 10) == [
    (0, 0, False),
    (0, 29, False),
    (29, 0, False),
    (29, 29, False),
    (14, 14, False),
    (0, 0, True),
    (0, 29, True),
    (29, 0, True),
    (29, 29, True),
    (14, 14, True),
  ]
  assert batches.eval_windows(256, 227, 1) == [(14, 14, False)]
  yy, xx = np.mgrid[0:32, 0:32]
  pixels = np.stack([yy * 7, xx * 7, (yy + xx) * 3], -1).astype(np.uint8)
  _, val = constant_folder(tmp_path, pixels)
  batch = next(batches.eval_batches(val, batch_size=1, image_size=24, resize_size=32, crops=10))
  patches = net_input(batch)[0]
  assert patches.shape == (10, 24, 24, 3)
  for patch, window in zip(patches, batches.eval_windows(32, 24, 10)):
    y, x = window.y, window.x
    expected = pixels[y : y + 24, x : x + 24].astype(np.float32)
    np.testing.assert_allclose(patch, expected[:, ::-1] if window.flipped else expected, atol=1.0)


def test_mean_image_is_subtracted_at_the_crop_position(tmp_path):
  """Images equal to the mean image become exactly zero, whatever the crop and the flip."""
  yy, xx = np.mgrid[0:32, 0:32]
  pixels = np.stack([yy * 7, xx * 7, (yy * xx) % 200], -1).astype(np.uint8)
  train, val = constant_folder(tmp_path, pixels)
  stats = Stats(pixels.astype(np.float32), ZERO.eigval, ZERO.eigvec)
  it = batches.train_batches(
    train, batch_size=1, seed=0, image_size=20, resize_size=32, stats=stats, pca_std=0.0
  )
  for _ in range(10):
    np.testing.assert_allclose(net_input(next(it), stats), 0.0, atol=1.0)
  for crops in (1, 10):
    batch = next(
      batches.eval_batches(val, batch_size=1, image_size=20, resize_size=32, crops=crops)
    )
    np.testing.assert_allclose(net_input(batch, stats), 0.0, atol=1.0)


def test_pipelines_run_without_tf_data_autotuning(mixed_folder):
  """Deleting an autotuned iterator waited for autotuning's sleeping thread (up to a minute,
  after every training run of an experiments suite): every pipeline turns it off."""
  train, val = sources.read_image_folder(mixed_folder)
  made = {
    "train": batches.train_batches(train, batch_size=2, seed=0, **PLAIN),
    "eval": batches.eval_batches(val, batch_size=2, **ARGS),
    "sample": batches.rescaled_sample(train, 32, 3),
  }
  for name, iterator in made.items():
    next(iterator)
    numpy_iterator = getattr(iterator, "_batches", iterator)
    assert numpy_iterator._dataset.options().autotune.enabled is False, name
