"""Orbax checkpoints in WORKDIR/checkpoints and the config saved beside them: the one module
that opens a checkpoint manager, chooses a step and restores.

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
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from alexnet_jax.core import files
from alexnet_jax.core.errors import UserInputError

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


def locate(path: str) -> tuple[str, int | None]:
  """(checkpoints folder, step or None) of a workdir, its checkpoints/ folder or one step's
  folder (checkpoints/<step>)."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise UserInputError(f"{path} does not exist: pass the workdir of a run")
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints"), None
  if os.path.basename(path) == "checkpoints":
    return path, None
  parent, name = os.path.split(path)
  if os.path.basename(parent) == "checkpoints" and name.isdigit():
    return parent, int(name)
  raise UserInputError(
    f"workdir {path} has no checkpoints/: train first with python -m alexnet_jax.main "
    f"--workdir={path}, or pass the workdir of a run"
  )


def choose_step(mgr: ocp.CheckpointManager, step: int | None = None) -> int:
  """`step`, or the latest finished one; a clear error when there is none."""
  steps = sorted(mgr.all_steps())
  if not steps:
    raise UserInputError(
      f"{mgr.directory} holds no finished checkpoint: train first, or pass another workdir"
    )
  if step is None:
    return steps[-1]
  if step not in steps:
    raise UserInputError(f"{mgr.directory} has no checkpoint at step {step}; it has steps {steps}")
  return step


def restore(mgr: ocp.CheckpointManager, target: Any, step: int | None = None) -> Any:
  """The whole state at `step` (default: latest) of a run's own manager, laid out like
  `target` (arrays or ShapeDtypeStructs: shapes and shardings), whatever mesh wrote it."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  step = choose_step(mgr, step)
  try:
    return mgr.restore(step, args=ocp.args.StandardRestore(abstract))
  except ValueError as e:
    if "tree structures do not match" not in str(e):
      raise
    workdir = os.path.dirname(str(mgr.directory))
    raise UserInputError(
      f"{mgr.directory}/{step} holds a training state of another alexnet_jax version (its "
      "fields differ from this one's), so it cannot be resumed: train in a fresh --workdir "
      f"with --config.init_from={workdir} to start from its parameters"
    ) from None


def read_params(path: str, step: int | None = None, target: Any = None) -> tuple[Any, int, str]:
  """(parameters, step, checkpoints folder) of a checkpoint of ours, the optimizer state
  left unread (orbax partial restore). path: see `locate`; step: default the one in path, else
  the latest. target: abstract parameters (`builders.abstract_state(...).params`) to place
  them on a mesh, any mesh; None: numpy arrays on the host."""
  ckpt_dir, step_in_path = locate(path)
  mgr = ocp.CheckpointManager(
    ckpt_dir,
    options=ocp.CheckpointManagerOptions(create=False),
    item_handlers=ocp.PyTreeCheckpointHandler(),
  )
  try:
    step = choose_step(mgr, step_in_path if step is None else step)
    if target is None:
      tree = mgr.item_metadata(step).tree
      if "params" not in tree:
        raise UserInputError(f"{ckpt_dir}/{step} holds no params: not a checkpoint of ours")
      target = tree["params"]
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    else:
      restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    params = mgr.restore(
      step,
      args=ocp.args.PyTreeRestore(
        item={"params": target}, restore_args={"params": restore_args}, partial_restore=True
      ),
    )["params"]
  finally:
    mgr.close()
  return params, step, ckpt_dir


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  files.write_text(os.path.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2))


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
