"""Checksums of a checkpoint's arrays, recorded when it is saved and compared when it is read.

Orbax stores arrays without a checksum of their values: bytes overwritten on disk decode to
other numbers and restore without error. Each array's checksum is computed on the devices
where it lives (no copy to the host, any number of processes) from its bits, as sums of
unsigned integers that wrap around: the same on every mesh and in every summation order, so
a checkpoint written on 8 devices verifies on 1.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _key(path: tuple) -> str:
  """'params/conv1/kernel' for a leaf of a TrainState or of the dict {"params": ...} alike."""
  names = []
  for entry in path:
    for attr in ("name", "key", "idx"):
      if hasattr(entry, attr):
        names.append(str(getattr(entry, attr)))
        break
  return "/".join(names)


def _leaf_sums(x: jax.Array) -> jax.Array:
  """Two 32-bit sums of the array's bits: plain, and each word weighted by an odd number that
  depends on its position (a changed word always changes it; moved words almost always)."""
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  bits = jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize]).astype(jnp.uint32)
  weights = jnp.arange(x.size, dtype=jnp.uint32) * jnp.uint32(2654435761) | jnp.uint32(1)
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])


@jax.jit
def _all_sums(leaves: list) -> list:
  return [_leaf_sums(x) for x in leaves]


def of(tree: Any) -> dict[str, list[int]]:
  """{leaf path: its two sums} of every array in tree (jax or numpy arrays)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  sums = jax.device_get(_all_sums([x for _, x in leaves]))
  return {_key(path): [int(v) for v in np.asarray(s)] for (path, _), s in zip(leaves, sums)}


def mismatches(tree: Any, recorded: dict[str, list[int]]) -> list[str]:
  """The paths of tree's arrays whose values differ from the checksums recorded for them."""
  actual = of(tree)
  return [key for key, sums in actual.items() if key in recorded and recorded[key] != sums]
