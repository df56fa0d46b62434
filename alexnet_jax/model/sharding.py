"""The ('data', 'model') device mesh and the rules that place parameters and batches on it.

`model` is 2 (one tower per device, as the paper's two GPUs) or 1 (both towers on every
device); `data` takes all remaining devices of all hosts.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from alexnet_jax.model.alexnet import TOWER_LAYERS, check_model_axis

# (regex on the "/"-joined parameter path, spec): the first match wins. Tower layers are
# split over `model` on their leading tower axis; everything else is replicated.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  (rf"(^|/)({'|'.join(TOWER_LAYERS)})/", P("model")),
  (r".*", P()),
)


def make_mesh(model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'model') mesh over `devices` (default: every device of every host)."""
  devices = list(jax.devices() if devices is None else devices)
  check_model_axis(model)
  if len(devices) % model:
    raise ValueError(
      f"{len(devices)} devices cannot be split into pairs for model={model}; use model=1"
    )
  shape = (len(devices) // model, model)
  try:  # topology-aware order on TPU/GPU: tower pairs on neighbouring chips
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (AssertionError, NotImplementedError, ValueError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, ("data", "model"))


def path_str(path: tuple) -> str:
  """A pytree key path as "conv1/kernel"."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def spec_for(name: str, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> P:
  for pattern, spec in rules:
    if re.search(pattern, name):
      return spec if isinstance(spec, P) else P(*spec)
  raise ValueError(f"no sharding rule matches parameter {name!r}; add a catch-all rule ('.*', ())")


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
  """A NamedSharding for every leaf of a parameter-shaped tree (params, optimizer state).

  Rules are searched anywhere in the path, so `opt_state/0/trace/conv1/kernel` follows
  the rule of `conv1/kernel`; scalars are replicated.
  """

  def one(path, leaf):
    if np.ndim(leaf) == 0:
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, spec_for(path_str(path), rules))

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches are split over `data` and replicated over `model` (each tower sees every image)."""
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  """A whole copy on every device of the mesh (the mean image, metrics, scalars)."""
  return NamedSharding(mesh, P())
