"""The embedded dataset: ten classes of textured patches on cluttered backgrounds.

Generated on first use and written as JPEG files in the ImageNet folder layout
(DIR/train/<class>/*.jpg, DIR/val/<class>/*.jpg), so the quickstart reads it through the
same pipeline as any user folder. Each image is a patch of its class's texture (random
period, phase, colours, patch shape and place) over a noisy colour gradient crossed by
distractor lines. The textures look the same mirrored, so the paper's horizontal flips
keep every label, and their periods survive conv1's stride 4 at 67-pixel crops.
Deterministic: the same seed gives the same bytes.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

SIDE = 96
_DONE = ".complete"


def _stripes(u, v, p, rng):
  return (u % p) < p / 2


def _checker(x, y, p, rng):
  return ((x // (p / 2)).astype(int) + (y // (p / 2)).astype(int)) % 2 == 0


def _dots(x, y, p, rng):
  return (x % p - p / 2) ** 2 + (y % p - p / 2) ** 2 < (0.3 * p) ** 2


def _grid(x, y, p, rng):
  return ((x % p) < p / 4) | ((y % p) < p / 4)


def _rings(x, y, p, rng):
  return (np.hypot(x - SIDE / 2, y - SIDE / 2) % p) < p / 2


def _diamonds(x, y, p, rng):
  return _checker(x + y, x - y, p * 1.4, rng)


def _zigzag(x, y, p, rng):
  return ((y + np.abs((x % p) - p / 2)) % p) < p / 2


def _speckle(x, y, p, rng):
  cells = rng.random((SIDE // 3, SIDE // 3)) < 0.5
  return cells[(y // 3).astype(int) % cells.shape[0], (x // 3).astype(int) % cells.shape[1]]


TEXTURES: dict[str, Callable] = {
  "checker": _checker,
  "diamonds": _diamonds,
  "dots": _dots,
  "grid": _grid,
  "hstripes": lambda x, y, p, rng: _stripes(y, x, p, rng),
  "rings": _rings,
  "solid": lambda x, y, p, rng: np.ones_like(x, bool),
  "speckle": _speckle,
  "vstripes": lambda x, y, p, rng: _stripes(x, y, p, rng),
  "zigzag": _zigzag,
}
CLASSES = tuple(sorted(TEXTURES))


def _colour(rng):
  return rng.integers(0, 256, 3).astype(np.float64)


def render(label: int, seed: Sequence[int]) -> Image.Image:
  """One SIDE x SIDE image of class `label`."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:SIDE, 0:SIDE].astype(np.float64)
  grad = np.linspace(-1, 1, SIDE)[:, None, None] * rng.uniform(-40, 40, 3)
  image = np.clip(_colour(rng) + grad + rng.normal(0, 12, (SIDE, SIDE, 3)), 0, 255)
  canvas = Image.fromarray(image.astype(np.uint8))
  draw = ImageDraw.Draw(canvas)
  for _ in range(int(rng.integers(2, 6))):  # clutter
    draw.line(
      list(rng.uniform(0, SIDE, 4)),
      fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
      width=int(rng.integers(1, 3)),
    )
  image = np.asarray(canvas, np.float64)

  half = rng.uniform(0.3, 0.45) * SIDE
  cx, cy = rng.uniform(half, SIDE - half, 2)
  period = rng.uniform(9, 14)
  shift_x, shift_y = rng.uniform(0, period, 2)  # patch-centred coordinates with a random phase
  pattern = TEXTURES[CLASSES[label]](
    x - cx + SIDE / 2 + shift_x, y - cy + SIDE / 2 + shift_y, period, rng
  )
  ink, paper = _colour(rng), _colour(rng)
  while np.abs(ink - paper).sum() < 150:  # a visible texture
    paper = _colour(rng)
  texture = np.where(pattern[..., None], ink, paper)

  patch = Image.new("L", (SIDE, SIDE), 0)
  box = [cx - half, cy - half, cx + half, cy + half]
  (ImageDraw.Draw(patch).ellipse if rng.random() < 0.5 else ImageDraw.Draw(patch).rectangle)(
    box, fill=255
  )
  inside = (np.asarray(patch) > 0)[..., None]
  out = np.where(inside, texture + rng.normal(0, 8, texture.shape), image)
  return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def _remove_others(folder: str, name: str, keep: set[str]) -> None:
  """Deletes the images an earlier, larger generation left in `folder`: only files named as
  this module names them, so nothing a user put there is touched."""
  for file in os.listdir(folder):
    if file.startswith(name + "_") and file.endswith(".jpg") and file not in keep:
      os.remove(os.path.join(folder, file))


def generate(
  data_dir: str, train_per_class: int = 300, val_per_class: int = 50, seed: int = 0
) -> str:
  """Writes the dataset under data_dir unless a complete copy is there; returns data_dir.

  A marker file written last makes an interrupted generation start again rather than
  leave a half-written dataset that looks complete; images of an earlier, larger
  generation are removed, so the folder holds exactly the dataset asked for.
  """
  marker = os.path.join(data_dir, _DONE)
  expected = f"{train_per_class} {val_per_class} {seed}"
  if os.path.exists(marker) and open(marker).read() == expected:
    return data_dir
  for split, count, offset in (("train", train_per_class, 0), ("val", val_per_class, 1 << 20)):
    for label, name in enumerate(CLASSES):
      folder = os.path.join(data_dir, split, name)
      os.makedirs(folder, exist_ok=True)
      names = [f"{name}_{i:05d}.jpg" for i in range(count)]
      _remove_others(folder, name, set(names))
      for i, file in enumerate(names):
        render(label, [seed, offset + label * count + i]).save(
          os.path.join(folder, file), quality=90
        )
  with open(marker, "w") as f:
    f.write(expected)
  return data_dir
