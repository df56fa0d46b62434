"""Exact nearest neighbours by Euclidean distance, as in the paper's Figure 4 (right).

The database is read in chunks (a numpy memmap bigger than memory works) and each chunk
is compared with every query on the accelerator: one jit-compiled step computes a
(query chunk x database chunk) block of squared distances and merges it into a running
top-k, so no full distance matrix ever exists. Every database chunk crosses to the device
once, the next one loading while the device works on the current one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax.errors import UserInputError


@functools.partial(jax.jit, static_argnames="k", donate_argnums=(0, 1))
def _merge(
  best_dist: jax.Array,
  best_index: jax.Array,
  queries: jax.Array,
  chunk: jax.Array,
  offset: jax.Array,
  size: jax.Array,
  k: int,
) -> tuple[jax.Array, jax.Array]:
  """The running k nearest, updated with one database chunk (rows at offset.., valid below size)."""
  # |q - d|^2 = |q|^2 - 2 q.d + |d|^2, the product at full float32 precision (not TF32/bf16 passes).
  dots = jnp.dot(queries, chunk.T, precision=jax.lax.Precision.HIGHEST)
  dist = jnp.sum(queries * queries, 1)[:, None] - 2 * dots + jnp.sum(chunk * chunk, 1)[None, :]
  index = offset + jnp.arange(chunk.shape[0], dtype=jnp.int32)
  dist = jnp.where(index[None, :] < size, jnp.maximum(dist, 0), jnp.inf)
  # Earlier (lower) indices come first, and top_k keeps the first of equal values: ties go low.
  dist = jnp.concatenate([best_dist, dist], 1)
  index = jnp.concatenate(
    [best_index, jnp.broadcast_to(index, (queries.shape[0], chunk.shape[0]))], 1
  )
  neg, pos = jax.lax.top_k(-dist, k)
  return -neg, jnp.take_along_axis(index, pos, 1)


def nearest(
  queries: np.ndarray,
  database: np.ndarray,
  k: int,
  *,
  query_chunk: int = 1024,
  database_chunk: int = 16384,
  device: jax.Device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """The k database rows nearest to each query: (indices (Q, k) int32, distances (Q, k) float32).

  Nearest first; among equal distances the lower index. database: (N, D), any array-like
  that slices into numpy (np.memmap included), read one chunk of rows at a time.
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
  qc, dc = min(query_chunk, len(queries)), min(database_chunk, n)
  padded = np.zeros((-(-len(queries) // qc) * qc, queries.shape[1]), np.float32)
  padded[: len(queries)] = queries
  query_chunks = [jax.device_put(padded[i : i + qc], device) for i in range(0, len(padded), qc)]
  best = [
    (
      jax.device_put(np.full((qc, k), np.inf, np.float32), device),
      jax.device_put(np.zeros((qc, k), np.int32), device),
    )
    for _ in query_chunks
  ]
  size = jnp.int32(n)
  for start in range(0, n, dc):
    rows = np.zeros((dc, queries.shape[1]), np.float32)
    rows[: min(dc, n - start)] = database[start : start + dc]
    chunk = jax.device_put(rows, device)
    best = [
      _merge(d, i, q, chunk, jnp.int32(start), size, k) for (d, i), q in zip(best, query_chunks)
    ]
  index = np.concatenate([np.asarray(i) for _, i in best])[: len(queries)]
  dist = np.concatenate([np.asarray(d) for d, _ in best])[: len(queries)]
  return index, np.sqrt(dist)
