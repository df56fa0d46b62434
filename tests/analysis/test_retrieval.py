"""Nearest neighbours: exactly a float64 brute force, from memory or a memmap; the features file."""

import numpy as np
import pytest

from alexnet_jax.analysis import featurefile, retrieval
from alexnet_jax.core.errors import UserInputError

# Distances are compared with rtol=2**-23: a returned distance is the float32 rounding of the
# float64 sqrt of the sum of squared differences of the rows (relative error <= 2**-24, plus
# < 1e-12 from the float64 sum), so within 2**-24 + 1e-12 < 2**-23 of the float64 brute force.
RTOL = 2.0**-23


def brute_force(queries, database, k):
  """Float64 distances of every pair; the k nearest by (distance, index)."""
  database = database.astype(np.float64)
  dist = np.stack([((q.astype(np.float64) - database) ** 2).sum(-1) for q in queries])
  index = np.argsort(dist, axis=1, kind="stable")[:, :k]  # ties: the lower index first
  return index, np.sqrt(np.take_along_axis(dist, index, 1))


@pytest.fixture
def data():
  rng = np.random.default_rng(0)
  database = rng.normal(size=(1000, 64)).astype(np.float32)
  queries = rng.normal(size=(37, 64)).astype(np.float32)
  database[[500, 999]] = database[3]  # exact ties: three rows at the same distance from any query
  queries[0] = database[3]
  return queries, database


def test_equals_brute_force_across_chunks(data):
  """Chunks that do not divide the query (37) or database (1000) counts: padding never leaks in."""
  queries, database = data
  expected_index, expected_dist = brute_force(queries, database, 6)
  for query_chunk, database_chunk in ((16, 128), (37, 1000), (5, 333)):
    index, dist = retrieval.nearest(
      queries, database, 6, query_chunk=query_chunk, database_chunk=database_chunk
    )
    np.testing.assert_array_equal(index, expected_index)
    np.testing.assert_allclose(dist, expected_dist, rtol=RTOL, atol=0)
  assert index[0, :3].tolist() == [3, 500, 999] and dist[0, :3].tolist() == [0, 0, 0]


@pytest.fixture(scope="module")
def fc7_like():
  """ReLU features, 4096-d, |x|^2 ~ 4600: the expansion |q|^2 - 2 q.d + |d|^2 subtracts terms of
  ~1e4 to get distances of 0 and ~0.06, so its float32 cancellation error (~1e-2 whatever the
  matmul's summation order, its result being a multiple of ulp(4600) = 2**-11 at best) is bigger
  than the distances themselves and than the gaps between near ties."""
  rng = np.random.default_rng(1)
  database = np.maximum(rng.normal(0, 1.5, (2000, 4096)), 0).astype(np.float32)
  queries = np.maximum(rng.normal(0, 1.5, (5, 4096)), 0).astype(np.float32)
  database[[7, 700, 1999]] = queries[0]  # exact duplicates, across database chunks
  # 100 near ties of queries[1] (more than the search keeps before its exact pass): one zero
  # coordinate set to 0.25 + j * 2**-20, distances 0.25..0.2501 about 1e-6 apart, the nearer
  # ones at the higher indices; rows 1234 and 1235 an exact tie.
  zeros = np.flatnonzero(queries[1] == 0)[:100]
  near = np.arange(1800, 1700, -1)
  database[near] = queries[1]
  database[near, zeros] = 0.25 + np.arange(100, dtype=np.float32) * 2.0**-20
  database[1234] = database[1235] = database[near[3]]
  return queries, database


def test_fc7_like_duplicates_and_near_ties_exactly(fc7_like):
  """Duplicates at exactly 0, near ties in float64 order, distances as a float64 brute force's."""
  queries, database = fc7_like
  expected_index, expected_dist = brute_force(queries, database, 6)
  assert expected_index[0, :3].tolist() == [7, 700, 1999]
  assert expected_index[1].tolist() == [1800, 1799, 1798, 1234, 1235, 1797]
  for query_chunk, database_chunk in ((2, 512), (5, 2000), (3, 777)):
    index, dist = retrieval.nearest(
      queries, database, 6, query_chunk=query_chunk, database_chunk=database_chunk
    )
    assert dist[0, :3].tolist() == [0, 0, 0]
    np.testing.assert_array_equal(index, expected_index)
    np.testing.assert_allclose(dist, expected_dist, rtol=RTOL, atol=0)


def test_database_can_be_a_memmap(data, tmp_path):
  queries, database = data
  path = str(tmp_path / "db.npy")
  np.save(path, database)
  index, _ = retrieval.nearest(queries, np.load(path, mmap_mode="r"), 4, database_chunk=256)
  np.testing.assert_array_equal(index, brute_force(queries, database, 4)[0])


def test_bad_shapes_and_k_are_named(data):
  queries, database = data
  with pytest.raises(UserInputError, match="same dim"):
    retrieval.nearest(queries[:, :10], database, 3)
  with pytest.raises(UserInputError, match="k=2000 neighbours asked from a database of 1000 rows"):
    retrieval.nearest(queries, database, 2000)


def test_features_file_round_trip_memory_maps_fc7(tmp_path):
  path = str(tmp_path / "f.npz")
  writer = featurefile.Writer(path, max_rows=5, dim=8, k=3)
  rows = np.arange(40, dtype=np.float32).reshape(5, 8)
  writer.append(
    rows[:2], [[0, 1, 2]] * 2, [[0.5, 0.3, 0.2]] * 2, ["a.jpg", "long/name.png"], [1, -1]
  )
  writer.append(rows[2:4], [[2, 1, 0]] * 2, [[0.6, 0.3, 0.1]] * 2, ["c.jpg", "d.jpg"], [0, 0])
  writer.close(classes=("x", "y", "z"), step=7)  # 4 of at most 5 rows (one image was unreadable)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npz"]  # the rows file is gone
  f = featurefile.read(path)
  assert isinstance(f["fc7"], np.memmap) and f["fc7"].dtype == np.float32
  np.testing.assert_array_equal(f["fc7"], rows[:4])
  assert f["path"].tolist() == ["a.jpg", "long/name.png", "c.jpg", "d.jpg"]
  assert (
    f["label"].tolist() == [1, -1, 0, 0]
    and f["classes"].tolist() == ["x", "y", "z"]
    and int(f["step"]) == 7
  )
  assert f["top5_index"].shape == (4, 3) and f["top5_prob"].dtype == np.float32


def test_features_file_errors(tmp_path):
  with pytest.raises(UserInputError, match="must end in .npz"):
    featurefile.Writer(str(tmp_path / "f.bin"), 1, 1, 1)
  with pytest.raises(UserInputError, match="does not exist"):
    featurefile.read(str(tmp_path / "missing.npz"))
  np.savez(tmp_path / "other.npz", x=np.zeros(2))
  with pytest.raises(UserInputError, match="not a features file"):
    featurefile.read(str(tmp_path / "other.npz"))
