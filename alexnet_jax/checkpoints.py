"""Orbax checkpoints in WORKDIR/checkpoints and the config saved beside them.

Saves are atomic (orbax writes to a temporary folder and renames it), so a finished
checkpoint is never replaced by a half-written one. The latest few are kept, and the
best by validation top-1 error.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from alexnet_jax.errors import UserInputError

BEST_METRIC = "val/top1_error"
CONFIG_FILE = "config.json"
# Settings a resumed run must share with the run that wrote the checkpoint.
_MUST_MATCH = ("model", "num_classes", "image_size", "batch_size", "dataset")


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  policy = policies.AnyPreservationPolicy(
    [
      policies.LatestN(keep),
      policies.BestN(
        get_metric_fn=lambda m: m[BEST_METRIC],
        reverse=True,
        n=1,
        keep_checkpoints_without_metrics=False,
      ),
    ]
  )
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True)
  return ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=options)


def save(mgr: ocp.CheckpointManager, step: int, state: Any, metrics: dict | None = None) -> None:
  mgr.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)


def restore(mgr: ocp.CheckpointManager, target: Any, step: int | None = None) -> Any:
  """The checkpoint at `step` (default: latest), laid out like `target` (shapes and shardings),
  whatever mesh wrote it."""
  step = mgr.latest_step() if step is None else step
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return mgr.restore(step, args=ocp.args.StandardRestore(abstract))


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict | None:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def check_resumable(workdir: str, config: ml_collections.ConfigDict) -> None:
  """A workdir with checkpoints must have been written with the same model settings."""
  saved = load_config(workdir)
  if saved is None:
    return
  for key in _MUST_MATCH:
    old, new = saved.get(key), config.get(key)
    old = old.to_dict() if isinstance(old, ml_collections.ConfigDict) else old
    new = new.to_dict() if isinstance(new, ml_collections.ConfigDict) else new
    if old != new:
      raise UserInputError(
        f"workdir {workdir} holds checkpoints of a run with {key}={old}, not {new}: "
        "use a fresh --workdir, or the settings of that run"
      )
