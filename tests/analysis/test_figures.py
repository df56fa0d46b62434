"""Figures are valid PNG files of the size they promise, and show what they should."""

import struct

import numpy as np
import pytest
from PIL import Image

from alexnet_jax.analysis import figures
from alexnet_jax.core import storage


def png_size(path):
  """(width, height) from the PNG signature and IHDR chunk; fails on anything else."""
  with open(path, "rb") as f:
    head = f.read(24)
  assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
  return struct.unpack(">II", head[16:24])


@pytest.mark.parametrize(
  "shape, rows_per_tower", [((2, 11, 11, 3, 48), 3), ((1, 11, 11, 3, 64), 4)]
)
def test_kernel_grid_png(tmp_path, shape, rows_per_tower):
  """The paper net's 2 x 48 kernels in two row blocks; torchvision's 64 in one."""
  kernel = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  path = str(tmp_path / "k.png")
  grid = figures.save_kernels(kernel, path, columns=16, scale=4, gap=1, tower_gap=6)
  towers = shape[0]
  rows = towers * rows_per_tower
  width = 16 * 44 + 17  # 16 cells of 11 x 4 pixels, 1-pixel gaps around them
  height = rows * 44 + (rows + 1) + (towers - 1) * 6
  assert grid.shape == (height, width, 3) and png_size(path) == (width, height)
  np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), grid)


def test_each_kernel_is_stretched_on_its_own_in_its_place():
  kernel = np.zeros((2, 11, 11, 3, 48), np.float32)
  kernel[1, :, :, :, 17] = np.linspace(-1e-3, 1e-3, 363).reshape(
    11, 11, 3
  )  # tiny: still full range
  kernel[0, 5, 5, 0, 0] = 100.0
  grid = figures.kernel_grid(kernel, columns=16, scale=1, gap=1, tower_gap=6)
  y, x = 1 + (3 + 1) * 12 + 6, 1 + 1 * 12  # tower 1, row 1, column 1
  tile = grid[y : y + 11, x : x + 11]
  assert tile.min() == 0 and tile.max() == 255 and tile[0, 0, 0] == 0 and tile[-1, -1, -1] == 255
  assert grid[1 + 5, 1 + 5, 0] == 255 and grid[1 + 5, 1 + 5, 1] == 0  # kernel 0: one red pixel


def test_figure4_and_curves_pngs(tmp_path):
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(3)]
  names = [["a", "b", "c", "d", "e"]] * 3
  figures.predictions(
    images, names, np.full((3, 5), 0.2), ["a", "z", "e"], str(tmp_path / "p.png"), dpi=50
  )
  assert png_size(str(tmp_path / "p.png")) == (round(2.2 * 3 * 50), round(4.4 * 50))
  figures.neighbours(images[:2], [images] * 2, str(tmp_path / "n.png"), dpi=50)
  assert png_size(str(tmp_path / "n.png")) == (round(1.2 * 4 * 50), round(1.2 * 2 * 50))
  records = [
    {
      "step": s,
      "train/loss": 1 / s,
      "train/top1_error": 0.5,
      "learning_rate": 0.01,
      "images_per_sec": 9,
    }
    for s in range(1, 5)
  ] + [{"step": 4, "val/loss": 0.4, "val/top1_error": 0.2, "val/top5_error": 0.1}]
  figures.training_curves(records, str(tmp_path / "c.png"), dpi=50)
  assert png_size(str(tmp_path / "c.png")) == (13 * 50, round(3.6 * 50))


def test_figures_from_features_files(tmp_path):
  """Rows of a features file: images read from their paths, class names from its classes."""
  paths = []
  for i, size in enumerate(((30, 50), (64, 64), (50, 20))):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.new("RGB", size, (40 * i, 0, 0)).save(paths[-1])
  assert figures.load_image(paths[0], side=16).shape == (16, 16, 3)
  features = {
    "path": np.asarray(paths),
    "label": np.asarray([0, 1, 2]),
    "classes": np.asarray(["p", "q", "r"]),
    "top5_index": np.asarray([[0, 1, 2]] * 3),
    "top5_prob": np.full((3, 3), 0.3, np.float32),
  }
  figures.predictions_of(features, [0, 2], str(tmp_path / "p.png"))
  figures.neighbours_of(features, features, [1], np.asarray([[2, 0]]), str(tmp_path / "n.png"))
  assert png_size(str(tmp_path / "p.png")) == (440, 440) and png_size(str(tmp_path / "n.png")) == (
    360,
    120,
  )


def test_figures_are_saved_into_a_bucket_as_they_are_locally(gcs, tmp_path):
  """The same PNG bytes in a bucket as in a local folder, each object uploaded whole."""
  bucket = gcs.bucket()
  kernel = np.random.default_rng(0).normal(size=(1, 11, 11, 3, 8)).astype(np.float32)
  records = [{"step": s, "train/loss": 1 / s, "learning_rate": 0.01} for s in range(1, 4)]
  for folder in (str(tmp_path), f"{bucket}/figures"):
    figures.save_kernels(kernel, f"{folder}/k.png", columns=4)
    figures.training_curves(records, f"{folder}/c.png", dpi=30)
  assert gcs.files(bucket) == [f"{bucket}/figures/c.png", f"{bucket}/figures/k.png"]
  for name in ("k.png", "c.png"):
    remote = storage.path(f"{bucket}/figures/{name}").read_bytes()
    assert remote == (tmp_path / name).read_bytes(), name
