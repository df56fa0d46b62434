"""Exact nearest neighbours by Euclidean distance, as in the paper's Figure 4 (right).

Two passes. The fast one reads the database in chunks (a numpy memmap bigger than memory works)
and compares each chunk with every query on the accelerator: one jit-compiled step computes a
(query chunk x database chunk) block of lower bounds on the squared distances, from the expansion
|q|^2 - 2 q.d + |d|^2, and merges it into a running top-m, m a little over k, so no full distance
matrix ever exists. Every database chunk crosses to the device once, the next one loading while
the device works on the current one. The exact pass gathers each query's m candidate rows, computes
|q - d|^2 from the rows' differences in float64 on the host and keeps the k nearest by (distance,
index).

Why the exact pass: the expansion cancels. For fc7 features (4096-d, |x|^2 in the thousands) its
float32 error is ~1e-2 in squared distance whatever the matmul's summation order: more than an
exact duplicate's distance (0) and than the gaps between near ties. The rows' differences do not
cancel: a duplicate is at exactly 0, and the order is a float64 brute force's.

Why m candidates are enough, for certain rather than likely (float32 arithmetic as CPUs and GPUs
do it at Precision.HIGHEST, barring overflow and underflow). With u = 2**-24, a length-D dot
product summed in any order (blocked, pairwise, with FMAs) errs by at most gamma sum|q_i d_i| <=
gamma |q||d| <= gamma (|q|^2 + |d|^2) / 2, gamma = D u / (1 - D u), and a squared norm by gamma
|q|^2; the two additions after them add at most ~4u (|q|^2 + |d|^2). So with the norms scaled by
a = 1 - ~2 gamma (`_scale`), the float32 value of a|q|^2 - 2 q.d + a|d|^2 is <= |q - d|^2 for every
row: a lower bound L. A row left out of a query's top-m by L has L >= L_m, the largest one kept,
so its exact squared distance is >= L_m; if L_m (less the float64 pass's own relative error
(D + 2) 2**-53) is above the k-th exact distance among the m, no row left out can be among the k
nearest, ties included. Where it is not (about m - k rows within 2 gamma (|q|^2 + |d|^2) ~ 5e-4
(|q|^2 + |d|^2) of the k-th nearest: many near ties or duplicates), those queries are searched
again with 4m candidates, until it is or m covers the database.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax.core.errors import UserInputError


def _scale(dim: int) -> float:
  """The largest float32 a with fl(a|q|^2 - 2 q.d + a|d|^2) <= |q - d|^2 for dim-d rows (or 0).

  With S = |q|^2 + |d|^2, the computed terms are <= a(1 + gamma)(1 + u) S in all for the scaled
  norms and <= -2 q.d + gamma S for the product, and the two additions (in either order) round
  sums of size <= 2(1 + gamma)(1 + u)^2 S: the result is <= |q - d|^2 + S (a(1 + gamma)(1 + u)
  - 1 + gamma + 4u(1 + gamma)(1 + u)^2), which a makes <= |q - d|^2 (4(1 + u)^2 <= 8).
  """
  u = 2.0**-24
  if dim * u >= 0.25:
    return 0.0
  gamma = dim * u / (1 - dim * u)
  a = (1 - gamma - 8 * u * (1 + gamma)) / ((1 + gamma) * (1 + u))
  a32 = np.float32(a)
  return float(np.nextafter(a32, np.float32(0)) if a32 > a else a32)


@functools.partial(jax.jit, static_argnames="m", donate_argnums=(0, 1))
def _merge(
  best_bound: jax.Array,
  best_index: jax.Array,
  queries: jax.Array,
  chunk: jax.Array,
  offset: jax.Array,
  size: jax.Array,
  scale: jax.Array,
  m: int,
) -> tuple[jax.Array, jax.Array]:
  """The running m smallest lower bounds, updated with one chunk (rows offset.., valid < size)."""
  # The product at full float32 precision (not TF32/bf16 passes): the bound assumes it.
  dots = jnp.dot(queries, chunk.T, precision=jax.lax.Precision.HIGHEST)
  norms = scale * jnp.sum(queries * queries, 1)
  bound = norms[:, None] - 2 * dots + (scale * jnp.sum(chunk * chunk, 1))[None, :]
  index = offset + jnp.arange(chunk.shape[0], dtype=jnp.int32)
  bound = jnp.where(index[None, :] < size, bound, jnp.inf)
  bound = jnp.concatenate([best_bound, bound], 1)
  index = jnp.concatenate(
    [best_index, jnp.broadcast_to(index, (queries.shape[0], chunk.shape[0]))], 1
  )
  neg, pos = jax.lax.top_k(-bound, m)
  return -neg, jnp.take_along_axis(index, pos, 1)


def _candidates(queries, database, m, query_chunk, database_chunk, device):
  """Each query's m rows of smallest lower bound L (indices), and the largest L kept, (Q,)."""
  n, dim = database.shape
  qc, dc = min(query_chunk, len(queries)), min(database_chunk, n)
  padded = np.zeros((-(-len(queries) // qc) * qc, dim), np.float32)
  padded[: len(queries)] = queries
  query_chunks = [jax.device_put(padded[i : i + qc], device) for i in range(0, len(padded), qc)]
  best = [
    (
      jax.device_put(np.full((qc, m), np.inf, np.float32), device),
      jax.device_put(np.zeros((qc, m), np.int32), device),
    )
    for _ in query_chunks
  ]
  size, scale = jnp.int32(n), jnp.float32(_scale(dim))
  for start in range(0, n, dc):
    rows = np.zeros((dc, dim), np.float32)
    rows[: min(dc, n - start)] = database[start : start + dc]
    chunk = jax.device_put(rows, device)
    best = [
      _merge(b, i, q, chunk, jnp.int32(start), size, scale, m)
      for (b, i), q in zip(best, query_chunks)
    ]
  index = np.concatenate([np.asarray(i) for _, i in best])[: len(queries)]
  bound = np.concatenate([np.asarray(b) for b, _ in best])[: len(queries)]
  return index, bound[:, -1]


def _exact(queries: np.ndarray, database, index: np.ndarray) -> np.ndarray:
  """float64 |q - d|^2 of each query and its rows index[q] (sorted, distinct), from the rows."""
  dist = np.empty(index.shape)
  step = min(index.shape[1], 1024)  # rows at a time: a widened search can keep many
  buffer = np.empty((step, queries.shape[1]))
  for i, q in enumerate(queries):
    for j in range(0, index.shape[1], step):
      rows = np.asarray(database[index[i, j : j + step]], np.float32)
      diff = np.subtract(rows, q.astype(np.float64), out=buffer[: len(rows)])
      dist[i, j : j + step] = np.einsum("md,md->m", diff, diff)
  return dist


class Neighbours(NamedTuple):
  """Each query's k nearest database rows, nearest first."""

  index: np.ndarray  # (Q, k) int32 row numbers into the database
  distance: np.ndarray  # (Q, k) float32 Euclidean distances


def nearest(
  queries: np.ndarray,
  database: np.ndarray,
  k: int,
  *,
  query_chunk: int = 1024,
  database_chunk: int = 16384,
  device: jax.Device | None = None,
) -> Neighbours:
  """The k database rows nearest to each query by Euclidean distance, exactly.

  Args:
    queries: (Q, D) features.
    database: (N, D), any array-like that slices into numpy (np.memmap included), read one
      chunk of rows at a time, then the few candidate rows of each query by increasing index.
    k: neighbours per query, 1 <= k <= N.
    query_chunk, database_chunk: rows compared at once on the device (memory, not results).
    device: where the comparisons run (default: the first device).

  Returns:
    Neighbours(index, distance), nearest first; among equal distances the lower index.
  """
  queries = np.asarray(queries, np.float32)
  n = len(database)
  if queries.ndim != 2 or len(database.shape) != 2 or queries.shape[1] != database.shape[1]:
    raise UserInputError(
      f"queries {queries.shape} and database {tuple(database.shape)} must be (count, dim) "
      "with the same dim"
    )
  if not 1 <= k <= n:
    raise UserInputError(f"k={k} neighbours asked from a database of {n} rows")
  device = device or jax.devices()[0]
  dim = queries.shape[1]
  # The float64 pass's distances are >= the exact ones times this.
  shrink = 1 - (dim + 2) * 2.0**-53 / (1 - (dim + 2) * 2.0**-53)
  index = np.zeros((len(queries), k), np.int32)
  dist = np.zeros((len(queries), k), np.float32)
  todo = np.arange(len(queries))
  m = min(n, k + max(k, 16)) if _scale(dim) > 0 else n
  while len(todo):
    cand, largest = _candidates(queries[todo], database, m, query_chunk, database_chunk, device)
    cand = np.sort(cand, 1)  # distinct rows; increasing for the gather (and the ties below)
    exact = _exact(queries[todo], database, cand)
    order = np.argsort(exact, 1, kind="stable")[:, :k]  # ties: the lower index first
    exact = np.take_along_axis(exact, order, 1)
    done = (
      np.ones(len(todo), bool) if m == n else largest.astype(np.float64) * shrink > exact[:, -1]
    )
    index[todo[done]] = np.take_along_axis(cand, order, 1)[done]
    dist[todo[done]] = np.sqrt(exact[done])
    todo, m = todo[~done], min(n, 4 * m)
  return Neighbours(index, dist)
