"""Orbax checkpoints in WORKDIR/checkpoints and the config saved beside them: the one module
that opens a checkpoint manager, chooses a step and restores.

Saves are atomic, so a finished checkpoint is never replaced by a half-written one: orbax
writes to a temporary folder and renames it, or in a bucket (gs://, no rename) writes the
step's folder and last its commit_success.txt, without which it is no step. The latest few
are kept, and the best by validation top-1 error. Each save records a checksum of every
array (`alexnet_jax.training.checksums`) in the step's orbax metadata, and every restore
compares them: a damaged checkpoint is never used; without a step asked for, the latest
good one is, with a warning.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as policies

from alexnet_jax.core import files, storage
from alexnet_jax.core.errors import UserInputError
from alexnet_jax.data import sync
from alexnet_jax.training import checksums, resume_rules

BEST_METRIC = "val/top1_error"
CONFIG_FILE = "config.json"
CHECKSUMS = "array_checksums"  # the key of the checksums in each step's orbax metadata
DAMAGED_DIR = "damaged_checkpoints"  # where a resumed run moves the damaged ones it skipped


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
  return ocp.CheckpointManager(storage.join(workdir, "checkpoints"), options=options)


def save(mgr: ocp.CheckpointManager, step: int, state: Any, metrics: dict | None = None) -> None:
  """Saves state at step with its arrays' checksums, in the same atomic write."""
  mgr.save(
    step,
    args=ocp.args.StandardSave(state),
    metrics=metrics,
    custom_metadata={CHECKSUMS: checksums.of(state)},
    force=True,
  )


def locate(path: str) -> tuple[str, int | None]:
  """(checkpoints folder, step or None) of a workdir, its checkpoints/ folder or one step's
  folder (checkpoints/<step>)."""
  path = storage.absolute(path)
  if not storage.path(path).is_dir():
    raise UserInputError(f"{path} does not exist: pass the workdir of a run")
  if storage.path(path).joinpath("checkpoints").is_dir():
    return storage.join(path, "checkpoints"), None
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


class _Damaged(Exception):
  """A checkpoint that cannot be read, or reads other values than were saved."""


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _verified(mgr: ocp.CheckpointManager, step: int, read: Callable[[int], Any]) -> Any:
  """read(step), its arrays compared with the checksums saved with them.

  Raises:
    _Damaged: the step cannot be read, or an array differs from its checksum.
  """
  try:
    recorded = (mgr.metadata(step).custom_metadata or {}).get(CHECKSUMS)
    tree = read(step)
  except UserInputError:
    raise
  except Exception as e:  # tensorstore raises a bare Exception for a cut file
    raise _Damaged(f"unreadable: {_first_line(e)}") from e
  if recorded is None:
    logging.info(
      "%s/%d was saved without checksums (an older version): not verified", mgr.directory, step
    )
    return tree
  bad = checksums.mismatches(tree, recorded)
  if bad:
    raise _Damaged(f"{len(bad)} arrays differ from their saved checksums: {', '.join(bad[:3])}")
  return tree


def _everywhere(ok: bool) -> bool:
  """True where every process read its part of a step well: they all go on with one step."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


@dataclasses.dataclass(frozen=True)
class _Found:
  step: int
  tree: Any
  damaged: dict[int, str]  # later steps skipped: why each is damaged


def _first_good(mgr: ocp.CheckpointManager, step: int | None, read: Callable[[int], Any]) -> _Found:
  """The step asked for, or else the latest step that reads back as saved."""
  chosen = choose_step(mgr, step)  # a clear error where there is no such step, or none
  candidates = [chosen] if step is not None else sorted(mgr.all_steps(), reverse=True)
  damaged: dict[int, str] = {}
  for candidate in candidates:
    tree, reason = None, ""
    try:
      tree = _verified(mgr, candidate, read)
    except _Damaged as e:
      reason = str(e)
    if _everywhere(not reason):
      return _Found(candidate, tree, damaged)
    damaged[candidate] = reason or "damaged on another process"
  listed = "; ".join(f"step {s}: {why}" for s, why in damaged.items())
  if step is not None:
    raise UserInputError(
      f"checkpoint {mgr.directory}/{step} is damaged ({listed}): it is not used; pass another "
      f"step (it has {sorted(mgr.all_steps())})"
    )
  raise UserInputError(
    f"every checkpoint in {mgr.directory} is damaged ({listed}): none is used; train in a "
    "fresh --workdir"
  )


def _set_aside(mgr: ocp.CheckpointManager, steps: list[int]) -> list[str]:
  """Moves damaged steps out of the checkpoints folder (kept to inspect, never resumed), so
  that the resumed run saves those steps afresh. Every process names the places before
  process 0 moves them: all log the same names."""
  directory = os.fspath(mgr.directory)
  workdir = os.path.dirname(directory)
  targets = []
  for step in steps:
    target = storage.join(workdir, DAMAGED_DIR, str(step))
    while storage.path(target).exists():
      target += "+"
    targets.append(target)
  sync.barrier("naming damaged checkpoints")
  if jax.process_index() == 0:
    storage.path(workdir).joinpath(DAMAGED_DIR).mkdir(parents=True, exist_ok=True)
    for step, target in zip(steps, targets):
      _move(storage.join(directory, str(step)), target)
  sync.barrier("setting damaged checkpoints aside")
  mgr.reload()
  return targets


def _move(folder: str, target: str) -> None:
  """Renames a step's folder. A bucket has no rename: its objects are copied to `target`,
  then the step's commit marker is deleted (from then on orbax counts no step there), then
  the rest. A run killed before the marker goes finds the step damaged again and copies it
  again (to target+); one killed after leaves an unfinished step, which orbax overwrites."""
  if not storage.is_remote(folder):
    os.rename(folder, target)
    return
  fs, name = storage.filesystem(folder)
  fs.copy(name, storage.filesystem(target)[1], recursive=True)
  fs.rm_file(f"{name}/{ocp.path.atomicity.COMMIT_SUCCESS_FILE}")
  fs.rm(name, recursive=True)


def restore(
  mgr: ocp.CheckpointManager, target: Any, step: int | None = None, set_aside: bool = False
) -> Any:
  """The whole state at `step` (default: the latest good one) of a run's own manager, laid
  out like `target` (arrays or ShapeDtypeStructs: shapes and shardings), whatever mesh wrote
  it. A damaged checkpoint is never used: a later one skipped is named in a warning (and with
  `set_aside`, as when resuming, moved to WORKDIR/damaged_checkpoints); none good, or the
  `step` asked for damaged, is a UserInputError."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)

  def read(s: int) -> Any:
    try:
      return mgr.restore(s, args=ocp.args.StandardRestore(abstract))
    except ValueError as e:
      if "tree structures do not match" not in str(e):
        raise
      workdir = os.path.dirname(os.fspath(mgr.directory))
      raise UserInputError(
        f"{mgr.directory}/{s} holds a training state of another alexnet_jax version (its "
        "fields differ from this one's), so it cannot be resumed: train in a fresh --workdir "
        f"with --config.init_from={workdir} to start from its parameters"
      ) from None

  found = _first_good(mgr, step, read)
  if found.damaged:
    moved = _set_aside(mgr, sorted(found.damaged)) if set_aside else []
    _warn_skipped(str(mgr.directory), found, moved)
  return found.tree


def _warn_skipped(directory: str, found: _Found, moved: list[str]) -> None:
  damaged = "; ".join(
    f"checkpoint {directory}/{s} is damaged ({why})" for s, why in found.damaged.items()
  )
  where = f", moved to {', '.join(moved)}" if moved else ""
  logging.warning("%s%s: using step %d instead, the latest good one", damaged, where, found.step)


def read_params(path: str, step: int | None = None, target: Any = None) -> tuple[Any, int, str]:
  """(parameters, step, checkpoints folder) of a checkpoint of ours, the optimizer state
  left unread (orbax partial restore), verified against their checksums. path: see `locate`;
  step: default the one in path, else the latest good one (a later damaged one is named in a
  warning). target: abstract parameters (`builders.abstract_state(...).params`) to place
  them on a mesh, any mesh; None: numpy arrays on the host."""
  ckpt_dir, step_in_path = locate(path)
  mgr = ocp.CheckpointManager(
    ckpt_dir,
    options=ocp.CheckpointManagerOptions(create=False),
    item_handlers=ocp.PyTreeCheckpointHandler(),
  )

  def read(s: int) -> Any:
    params = target
    if params is None:
      tree = mgr.item_metadata(s).tree
      if "params" not in tree:
        raise UserInputError(f"{ckpt_dir}/{s} holds no params: not a checkpoint of ours")
      params = tree["params"]
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), params)
    else:
      restore_args = ocp.checkpoint_utils.construct_restore_args(params)
    return mgr.restore(
      s,
      args=ocp.args.PyTreeRestore(
        item={"params": params}, restore_args={"params": restore_args}, partial_restore=True
      ),
    )

  try:
    found = _first_good(mgr, step_in_path if step is None else step, read)
  finally:
    mgr.close()
  if found.damaged:
    _warn_skipped(ckpt_dir, found, [])
  return found.tree["params"], found.step, ckpt_dir


def save_config(workdir: str, config: ml_collections.ConfigDict, step: int = 0) -> None:
  """Writes config.json; a resumed run (at `step`) that changed settings keeps the previous
  config as config.<step>.json beside it, so every value a step was trained with is known."""
  path = storage.join(workdir, CONFIG_FILE)
  text = config.to_json_best_effort(indent=2)
  kept = storage.join(workdir, f"config.{step}.json")
  # Not at step 0, nor over a kept one: a rerun from that step kept nothing of the runs between.
  if step and storage.path(path).exists() and not storage.path(kept).exists():
    previous = storage.path(path).read_text()
    if previous != text:
      files.write_text(kept, previous)
  files.write_text(path, text)


def load_config(workdir: str) -> ml_collections.ConfigDict | None:
  path = storage.path(workdir).joinpath(CONFIG_FILE)
  if not path.exists():
    return None
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def check_resumable(workdir: str, config: ml_collections.ConfigDict) -> None:
  """A workdir with checkpoints resumes only with the settings its run was trained with, but
  for those `resume_rules.RULES` lets change; a one-line error names the others."""
  saved = load_config(workdir)
  if saved is None:
    return
  changes = resume_rules.compare(saved, config)
  if changes.refused:
    raise UserInputError(resume_rules.refusal(workdir, changes.refused))
  for change in changes.applied:
    logging.info("resumed with %s=%r (was %r)", change.key, change.new, change.old)
