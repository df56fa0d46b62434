"""The agreement of two features files: each measure moves when, and only when, its part of
the files differs."""

import numpy as np
import pytest

from alexnet_jax.analysis import dtype_agreement
from alexnet_jax.core.errors import UserInputError


def features_file(rng, n=12, dim=16):
  return {
    "path": np.array([f"img{i}.jpg" for i in range(n)]),
    "fc7": rng.normal(size=(n, dim)).astype(np.float32),
    "top5_index": np.array([rng.permutation(10)[:5] for _ in range(n)]),
  }


def test_the_same_file_agrees_fully():
  f = features_file(np.random.default_rng(0))
  a = dtype_agreement.compare(f, f, k=3)
  assert (a.images, a.top1, a.top5, a.neighbours, a.k) == (12, 1.0, 1.0, 1.0, 3)
  assert a.cosine_mean == pytest.approx(1.0) and a.cosine_min == pytest.approx(1.0)


def test_each_measure_sees_its_own_change():
  rng = np.random.default_rng(1)
  f = features_file(rng)
  g = dict(f, top5_index=f["top5_index"].copy())
  g["top5_index"][0, [0, 1]] = g["top5_index"][0, [1, 0]]  # the same 5 classes, top-1 swapped
  a = dtype_agreement.compare(f, g, k=3)
  assert a.top1 == pytest.approx(11 / 12) and a.top5 == 1.0 and a.cosine_min == pytest.approx(1.0)
  g = dict(f, fc7=f["fc7"] * 3.0)  # longer, same direction: the cosine does not see length
  assert dtype_agreement.compare(f, g, k=3).cosine_min == pytest.approx(1.0)
  g = dict(f, fc7=f["fc7"].copy())
  g["fc7"][5] = -g["fc7"][5]
  a = dtype_agreement.compare(f, g, k=3)
  assert a.cosine_min == pytest.approx(-1.0) and a.neighbours < 1.0 and a.top1 == 1.0


def test_a_row_among_exact_duplicates_is_not_its_own_neighbour():
  f = features_file(np.random.default_rng(2))
  f["fc7"][:5] = f["fc7"][0]  # 5 equal rows: each one's 3 nearest others are among the other 4
  index = dtype_agreement.nearest_others(f["fc7"], 3)
  assert index.shape == (12, 3)
  assert all(i not in row for i, row in enumerate(index))
  assert all(set(row) <= set(range(5)) - {i} for i, row in enumerate(index[:5]))


def test_bad_pairs_are_one_line_errors():
  f = features_file(np.random.default_rng(3))
  with pytest.raises(UserInputError, match="hold different images: extract the same ones"):
    dtype_agreement.compare(f, dict(f, path=f["path"][::-1]))
  with pytest.raises(UserInputError, match="k=12 neighbours need more than 12 images"):
    dtype_agreement.compare(f, f, k=12)
