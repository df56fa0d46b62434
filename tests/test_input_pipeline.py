"""Image folders: formats, labels, crops, host shares, padding, determinism, resume, bad input."""

import os

import numpy as np
import pytest
from PIL import Image

from alexnet_jax import input_pipeline as ip
from alexnet_jax.errors import UserInputError

ARGS = dict(image_size=24, resize_size=32, mean=(0.0, 0.0, 0.0))


def write(path, mode, size, value):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
  array = np.full(size[::-1] + ((channels,) if channels > 1 else ()), value, np.uint8)
  Image.fromarray(array, mode).save(path)


@pytest.fixture
def folder(tmp_path):
  """Three classes: a PNG, a grayscale JPEG, an RGBA PNG, and ordinary JPEGs of mixed sizes."""
  root = tmp_path / "data"
  write(str(root / "train/b_dog/png.png"), "RGB", (40, 50), 10)
  write(str(root / "train/b_dog/gray.jpg"), "L", (64, 32), 100)
  write(str(root / "train/c_fox/rgba.png"), "RGBA", (33, 33), 200)
  for i in range(5):
    write(str(root / f"train/a_cat/{i}.jpeg"), "RGB", (48 + i, 36), 50)
  (root / "train/a_cat/readme.txt").write_text("not an image")
  write(str(root / "val/a_cat/v.jpg"), "RGB", (40, 40), 50)
  write(str(root / "val/c_fox/v.png"), "RGBA", (40, 60), 200)
  write(str(root / "val/c_fox/w.png"), "L", (40, 60), 200)
  return str(root)


def test_classes_sorted_to_labels_and_all_formats_decode(folder):
  train, val = ip.read_image_folder(folder)
  assert train.classes == ("a_cat", "b_dog", "c_fox") and len(train) == 8
  assert val.classes == train.classes and sorted(val.labels.tolist()) == [0, 2, 2]
  batch = next(ip.train_batches(train, batch_size=8, seed=0, **ARGS))
  assert batch["image"].shape == (8, 24, 24, 3) and batch["image"].dtype == np.float32
  by_label = {int(l): img for l, img in zip(batch["label"], batch["image"])}
  np.testing.assert_allclose(by_label[2], 200, atol=1)  # RGBA -> RGB, alpha dropped
  gray = [img for l, img, in zip(batch["label"], batch["image"]) if l == 1 and abs(img.mean() - 100) < 2]
  assert gray and np.allclose(gray[0][..., 0], gray[0][..., 2])  # grayscale -> three equal channels


def test_mean_is_subtracted(folder):
  train, _ = ip.read_image_folder(folder)
  batch = next(ip.train_batches(train, batch_size=8, seed=0, image_size=24, resize_size=32, mean=(10.0, 20.0, 30.0)))
  rgba = batch["image"][batch["label"] == 2][0]
  np.testing.assert_allclose(rgba.mean(axis=(0, 1)), [190, 180, 170], atol=1)


def test_eval_covers_the_split_once_with_padding(folder):
  _, val = ip.read_image_folder(folder)
  batches = list(ip.eval_batches(val, batch_size=2, **ARGS))
  assert len(batches) == 2
  assert [b["mask"].tolist() for b in batches] == [[1, 1], [1, 0]]
  labels = [l for b in batches for l, m in zip(b["label"], b["mask"]) if m]
  assert sorted(labels) == [0, 2, 2]
  # Two processes: equal numbers of batches, disjoint images, the split covered once.
  shares = [list(ip.eval_batches(val, batch_size=1, process_index=i, process_count=2, **ARGS)) for i in range(2)]
  assert len(shares[0]) == len(shares[1]) == 2
  assert sum(float(b["mask"].sum()) for s in shares for b in s) == 3


def train_stream(split, steps, **kw):
  it = ip.train_batches(split, batch_size=2, seed=3, **ARGS, **kw)
  return [next(it) for _ in range(steps)]


def test_training_order_is_seeded_disjoint_per_host_and_resumable(folder):
  train, _ = ip.read_image_folder(folder)
  a, b = train_stream(train, 8), train_stream(train, 8)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
  # Resuming at step 5 yields exactly the batches 5, 6, 7 of the uninterrupted stream.
  for x, y in zip(a[5:], train_stream(train, 3, start_step=5)):
    np.testing.assert_array_equal(x["image"], y["image"])
  # Per epoch (4 images per host with 2 hosts), the hosts' shares are disjoint and cover 8 files.
  def files(pi):
    it = ip.train_batches(train, batch_size=4, seed=3, process_index=pi, process_count=2, **ARGS)
    return next(it)
  h0, h1 = files(0), files(1)
  pixels = sorted(round(float(v), 1) for h in (h0, h1) for v in h["image"].mean(axis=(1, 2, 3)))
  assert len(pixels) == 8
  epoch_one = [img.mean() for batch in a[:4] for img in batch["image"]]
  assert sorted(round(float(v), 1) for v in epoch_one) == pixels


def test_augmentation_crops_and_flips_vary(tmp_path):
  root = tmp_path / "d"
  gradient = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 3))
  for split in ("train", "val"):
    os.makedirs(root / split / "x")
    Image.fromarray(gradient).save(root / split / "x" / "g.png")
  train, _ = ip.read_image_folder(str(root))
  it = ip.train_batches(train, batch_size=1, seed=0, image_size=24, resize_size=64, mean=(0, 0, 0))
  crops = {tuple(next(it)["image"][0, 0, [0, -1], 0].tolist()) for _ in range(12)}
  assert len(crops) > 3  # different offsets
  assert any(a > b for a, b in crops) and any(a < b for a, b in crops)  # both orientations


@pytest.mark.parametrize("layout, message", [
    (None, "does not exist"),
    ({"train/a/x.jpg": 1}, "no 'val' folder"),
    ({"train/a/x.jpg": 1, "val/b/y.jpg": 1}, r"class folder\(s\) \['b'\] .* not in train"),
    ({"train/a/notes.txt": 0, "val/a/y.jpg": 1}, "no .jpg/.jpeg/.png images"),
    ({"train/x.jpg": 1, "val/y.jpg": 1}, "has no class folders"),
])
def test_bad_folders_are_named(tmp_path, layout, message):
  root = tmp_path / "d"
  for rel, is_image in (layout or {}).items():
    path = root / rel
    os.makedirs(path.parent, exist_ok=True)
    if is_image:
      write(str(path), "RGB", (8, 8), 0)
    else:
      path.write_text("x")
  with pytest.raises(UserInputError, match=message):
    ip.read_image_folder(str(root))
