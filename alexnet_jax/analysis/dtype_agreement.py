"""How far two features files of the same images differ: what bfloat16 extraction changes
against float32 (`benchmarks/extract_dtype.py`, docs/features.md).

Three views of "the same result", each what a user of the file reads: the predicted class, the
fc7 vector's direction, and the retrieval neighbours of Figure 4 (each image's k nearest
others by Euclidean distance, `retrieval.nearest`, the query itself left out).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from alexnet_jax.analysis import retrieval
from alexnet_jax.core.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class Agreement:
  images: int
  top1: float  # fraction of images with the same top-1 class
  top5: float  # mean fraction of the top-5 classes both files list (as sets)
  cosine_mean: float  # fc7 cosine similarity, row by row
  cosine_min: float
  neighbours: float  # mean fraction of each image's k nearest others both files find
  k: int


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a, b = a.astype(np.float64), b.astype(np.float64)
  norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
  dots = np.einsum("ij,ij->i", a, b)
  # Two zero rows (a dead fc7) are the same vector; one zero row is not.
  return np.where(norms > 0, dots / np.where(norms > 0, norms, 1), np.all(a == b, axis=1))


def nearest_others(fc7: np.ndarray, k: int) -> np.ndarray:
  """(N, k) row numbers: each fc7 row's k nearest other rows, nearest first (Figure 4's
  neighbours). k + 1 are asked and the row itself dropped, wherever it lands among exact
  duplicates of it."""
  index = retrieval.nearest(fc7, fc7, k + 1).index
  own = index == np.arange(len(fc7))[:, None]
  keep = ~own
  keep[~own.any(axis=1), -1] = False  # the row fell out among duplicates: drop the farthest
  return index[keep].reshape(len(fc7), k)


def compare(
  reference: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray], k: int = 10
) -> Agreement:
  """The agreement of `other` with `reference`, two features files (`featurefile.read`) of
  the same images in the same order.

  Args:
    reference, other: the files' arrays (path, fc7, top5_index).
    k: retrieval neighbours per image, 1 <= k < images.

  Returns:
    Agreement: fractions in [0, 1] and fc7 cosines, over all images.
  """
  if not np.array_equal(reference["path"], other["path"]):
    raise UserInputError("the two features files hold different images: extract the same ones")
  n = len(reference["path"])
  if not 1 <= k < n:
    raise UserInputError(f"k={k} neighbours need more than {k} images; the files hold {n}")
  top_a, top_b = reference["top5_index"], other["top5_index"]
  cos = _cosines(reference["fc7"], other["fc7"])
  shared = lambda a, b: np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)])
  return Agreement(
    images=n,
    top1=float(np.mean(top_a[:, 0] == top_b[:, 0])),
    top5=float(shared(top_a, top_b)),
    cosine_mean=float(cos.mean()),
    cosine_min=float(cos.min()),
    neighbours=float(shared(nearest_others(reference["fc7"], k), nearest_others(other["fc7"], k))),
    k=k,
  )
