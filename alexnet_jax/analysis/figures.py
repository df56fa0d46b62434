"""The paper's figures as PNG files: conv1's kernels (Figure 3), predictions and nearest
neighbours (Figure 4), and training curves from metrics.jsonl.

Plain functions of arrays (no checkpoint or data pipeline here); each writes a PNG of a
fixed pixel size (figure inches x dpi, no tight cropping) and returns what it drew. A PNG is
written whole or not at all (`files.atomic_path`), into a local folder or a bucket (gs://)
alike: matplotlib draws into a local file, which a bucket receives in one upload.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.image
import numpy as np
from matplotlib.figure import Figure  # not pyplot: no global figure state, no GUI backend
from PIL import Image

from alexnet_jax.core import files


def kernel_grid(
  kernel: np.ndarray, columns: int = 16, scale: int = 4, gap: int = 1, tower_gap: int = 6
) -> np.ndarray:
  """conv1's kernels (towers, k, k, 3, n) as one RGB uint8 image, like the paper's Figure 3.

  Each tower's n kernels fill rows of `columns`; the towers' blocks stand one above the
  other, `tower_gap` pixels apart. Each kernel is stretched to the full range on its own
  (their scales differ too much to share one), and enlarged `scale` times.
  """
  towers, k, _, _, n = kernel.shape
  rows, cell = -(-n // columns), k * scale
  width = columns * cell + (columns + 1) * gap
  height = towers * rows * cell + (towers * rows + 1) * gap + (towers - 1) * tower_gap
  grid = np.full((height, width, 3), 255, np.uint8)
  for t in range(towers):
    for i in range(n):
      w = kernel[t, :, :, :, i].astype(np.float64)
      w = (w - w.min()) / max(w.max() - w.min(), 1e-12)
      tile = np.kron(w, np.ones((scale, scale, 1)))
      r, c = t * rows + i // columns, i % columns
      y, x = gap + r * (cell + gap) + t * tower_gap, gap + c * (cell + gap)
      grid[y : y + cell, x : x + cell] = np.round(255 * tile)
  return grid


def save_kernels(kernel: np.ndarray, path: str, **grid_args) -> np.ndarray:
  """Figure 3: writes kernel_grid(kernel) as a PNG of exactly the grid's pixels; returns the
  grid."""
  grid = kernel_grid(kernel, **grid_args)
  with files.atomic_path(path) as tmp:
    matplotlib.image.imsave(tmp, grid)
  return grid


def load_image(path: str, side: int = 128) -> np.ndarray:
  """An image file's central square at side x side (RGB uint8), for display."""
  with Image.open(path) as image:
    image = image.convert("RGB")
    s = min(image.size)
    left, top = (image.width - s) // 2, (image.height - s) // 2
    return np.asarray(
      image.crop((left, top, left + s, top + s)).resize((side, side), Image.BILINEAR)
    )


def _save(fig: Figure, path: str | None) -> Figure:
  if path:
    with files.atomic_path(path) as tmp:
      fig.savefig(tmp, dpi=fig.dpi)
  return fig


def predictions(
  images: Sequence[np.ndarray],
  top_names: Sequence[Sequence[str]],
  top_probs: np.ndarray,
  true_names: Sequence[str] | None = None,
  path: str | None = None,
  dpi: int = 100,
) -> Figure:
  """Figure 4 (left): each image above its top-k labels and their probabilities as bars;
  the bar of the true label, when it is among them, in red as in the paper."""
  n = len(images)
  fig = Figure(figsize=(2.2 * n, 4.4), dpi=dpi)
  axes = fig.subplots(2, n, squeeze=False)
  for j in range(n):
    image_ax, bar_ax = axes[0, j], axes[1, j]
    image_ax.imshow(images[j])
    image_ax.set_axis_off()
    if true_names is not None:
      image_ax.set_title(true_names[j], fontsize=9)
    names, probs = list(top_names[j]), np.asarray(top_probs[j])
    colours = [
      "tab:red" if true_names is not None and name == true_names[j] else "tab:blue"
      for name in names
    ]
    ypos = np.arange(len(names))[::-1]
    bar_ax.barh(ypos, probs, color=colours)
    for y, name in zip(ypos, names):
      bar_ax.text(0.02, y, name, va="center", fontsize=8)
    bar_ax.set_xlim(0, 1)
    bar_ax.set_yticks([])
    bar_ax.tick_params(labelsize=7)
  fig.subplots_adjust(left=0.02, right=0.98, top=0.93, bottom=0.06, wspace=0.1, hspace=0.15)
  return _save(fig, path)


def neighbours(
  query_images: Sequence[np.ndarray],
  neighbour_images: Sequence[Sequence[np.ndarray]],
  path: str | None = None,
  dpi: int = 100,
) -> Figure:
  """Figure 4 (right): each query image (first column) beside its nearest training images."""
  rows, k = len(query_images), len(neighbour_images[0])
  fig = Figure(figsize=(1.2 * (k + 1), 1.2 * rows), dpi=dpi)
  axes = fig.subplots(rows, k + 1, squeeze=False)
  for r in range(rows):
    for c, image in enumerate([query_images[r], *neighbour_images[r]]):
      axes[r, c].imshow(image)
      axes[r, c].set_xticks([])
      axes[r, c].set_yticks([])
      if c == 0:
        for spine in axes[r, c].spines.values():
          spine.set(color="tab:red", linewidth=2)
  axes[0, 0].set_title("query", fontsize=8)
  for c in range(1, k + 1):
    axes[0, c].set_title(f"#{c}", fontsize=8)
  fig.subplots_adjust(
    left=0.01, right=0.99, top=1 - 0.25 / rows, bottom=0.01, wspace=0.05, hspace=0.05
  )
  return _save(fig, path)


def training_curves(records: Sequence[dict], path: str | None = None, dpi: int = 100) -> Figure:
  """Loss, top-1/top-5 error and learning rate against the step, from metrics.read_metrics."""
  fig = Figure(figsize=(13, 3.6), dpi=dpi)
  loss_ax, error_ax, lr_ax = fig.subplots(1, 3)

  def plot(ax, key, label, scale=1.0, **style):
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    if points:
      steps, values = zip(*points)
      ax.plot(steps, np.asarray(values) * scale, label=label, **style)

  plot(loss_ax, "train/loss", "train")
  plot(loss_ax, "val/loss", "val", marker="o")
  plot(error_ax, "train/top1_error", "train top-1", 100)
  plot(error_ax, "val/top1_error", "val top-1", 100, marker="o")
  plot(error_ax, "val/top5_error", "val top-5", 100, marker="s")
  plot(lr_ax, "learning_rate", "learning rate")
  for ax, title in ((loss_ax, "loss"), (error_ax, "error (%)"), (lr_ax, "learning rate")):
    ax.set_title(title)
    ax.set_xlabel("step")
    if ax.lines:
      ax.legend(fontsize=8)
  if lr_ax.lines and min(lr_ax.lines[0].get_ydata()) > 0:
    lr_ax.set_yscale("log")
  fig.subplots_adjust(left=0.05, right=0.98, top=0.9, bottom=0.15, wspace=0.25)
  return _save(fig, path)


def _names(features: dict, indices: Sequence[int]) -> list[str]:
  classes = features["classes"]
  return [str(classes[i]) if len(classes) else str(i) for i in indices]


def predictions_of(
  features: dict, rows: Sequence[int], path: str | None = None, side: int = 128
) -> Figure:
  """Figure 4 (left) for rows of a features file (featurefile.read): its images, top-5 and
  labels."""
  labels = features["label"][rows]
  true = _names(features, labels) if np.all(labels >= 0) else None
  return predictions(
    [load_image(features["path"][r], side) for r in rows],
    [_names(features, features["top5_index"][r]) for r in rows],
    features["top5_prob"][rows],
    true,
    path,
  )


def neighbours_of(
  queries: dict,
  database: dict,
  rows: Sequence[int],
  index: np.ndarray,
  path: str | None = None,
  side: int = 96,
) -> Figure:
  """Figure 4 (right) for rows of a query features file and their neighbours' rows `index` in a
  database file."""
  return neighbours(
    [load_image(queries["path"][r], side) for r in rows],
    [[load_image(database["path"][j], side) for j in row] for row in index],
    path,
  )


def _band(ax, steps: np.ndarray, runs: np.ndarray, colour, label: str, **style) -> None:
  """The mean over seeds (rows of `runs`) as a line, their range as a band."""
  ax.plot(steps, 100 * runs.mean(0), color=colour, label=label, **style)
  if len(runs) > 1:
    ax.fill_between(steps, 100 * runs.min(0), 100 * runs.max(0), color=colour, alpha=0.2)


def suite_curves(curves: dict, path: str | None = None, dpi: int = 100) -> Figure:
  """Training and validation top-1 error against the step, one colour per variant, seeds as a
  band. curves: {variant: {"train": (steps, errors per seed), "val": (steps, errors per seed)}}
  with errors as (seeds, steps) arrays."""
  fig = Figure(figsize=(12, 4), dpi=dpi)
  train_ax, val_ax = fig.subplots(1, 2)
  colours = matplotlib.colormaps["tab10"]
  for k, (variant, parts) in enumerate(curves.items()):
    for ax, key, style in ((train_ax, "train", {}), (val_ax, "val", {"marker": "o"})):
      steps, runs = parts[key]
      if len(steps):
        _band(ax, steps, runs, colours(k % 10), variant, **style)
  for ax, title in ((train_ax, "training top-1 error (%)"), (val_ax, "validation top-1 error (%)")):
    ax.set_title(title)
    ax.set_xlabel("step")
    if ax.lines:
      ax.legend(fontsize=8)
  fig.subplots_adjust(left=0.06, right=0.98, top=0.9, bottom=0.13, wspace=0.2)
  return _save(fig, path)


def figure1(
  curves: dict, target: float, reached: dict, path: str | None = None, dpi: int = 100
) -> Figure:
  """The paper's Figure 1: training error against epochs for ReLU and tanh (seeds as a band),
  the target error, and the epoch each variant first reaches it. curves: {variant: (epochs,
  (seeds, epochs) training errors)}; reached: {variant: epoch or None}."""
  fig = Figure(figsize=(6, 4.5), dpi=dpi)
  ax = fig.subplots()
  colours = {"relu": "tab:blue", "baseline": "tab:blue", "tanh": "tab:red"}
  for variant, (epochs, runs) in curves.items():
    when = reached.get(variant)
    label = f"{variant}: {target:.0%} at epoch {when:.2f}" if when else f"{variant}: not reached"
    _band(ax, epochs, runs, colours.get(variant, "tab:gray"), label)
  ax.axhline(100 * target, color="black", linestyle="--", linewidth=1)
  ax.set_xlabel("epochs")
  ax.set_ylabel("training error rate (%)")
  ax.set_title("Figure 1: ReLU against tanh")
  ax.legend(fontsize=8)
  fig.subplots_adjust(left=0.12, right=0.97, top=0.91, bottom=0.12)
  return _save(fig, path)
