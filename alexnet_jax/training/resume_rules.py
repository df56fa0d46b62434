"""Which settings a resumed run may change: the one table, a rule for every config key.

A run resumed from a checkpoint continues the training the checkpoint is part of. Settings
that decide when and where things happen (step counts, intervals, devices, where the same
data lies) may change: the new values apply from the resumed step on and the previous config
is kept beside config.json. Settings that decide what is computed (the net, the data and its
augmentation, the optimiser, the schedule, the seed) may not: the checkpoint's state was made
with them, and some live on inside it (a constant or plateau rate is in the optimizer state),
so a new value would be recorded but not used. Those are a one-line error naming the keys.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import ml_collections

from alexnet_jax.core import files, storage
from alexnet_jax.core.errors import UserInputError
from alexnet_jax.training import class_names
from alexnet_jax.training.config_check import same_setting

DATA_FILE = "data.json"  # the sizes of the data a run trains on, to know it when it moves


@dataclasses.dataclass(frozen=True)
class Rule:
  """may_change: a resumed run may give the key another value; except under the learning-rate
  schedule `unless_schedule`, which the value shapes."""

  may_change: bool
  unless_schedule: str = ""

  def fixed(self, schedule: str) -> bool:
    return not self.may_change or schedule == self.unless_schedule


FREE = Rule(True)
FIXED = Rule(False)
# The total step count: a longer run continues a piecewise, plateau or constant schedule
# unchanged, but a cosine decay spans the total, so a new total rewrites the rates behind it.
STEP_COUNT = Rule(True, unless_schedule="cosine")

RULES: dict[str, Rule] = {
  # Data: what the net sees.
  "dataset": FIXED,
  "data_dir": FREE,  # the same data may move (staged to a local disk): train.py checks it is
  "stage_dir": FREE,  # where a bucket's data is copied: the same data
  "train_split": FIXED,
  "eval_split": FIXED,
  "stats_images": FIXED,
  "num_classes": FIXED,
  "image_size": FIXED,
  "resize_size": FIXED,
  "synthetic_train_per_class": FIXED,
  "synthetic_val_per_class": FIXED,
  "synthetic_seed": FIXED,
  "num_parallel_calls": FREE,  # threads, not values
  "channel_mean": FIXED,
  "mean_subtraction": FIXED,
  "pca_noise_std": FIXED,
  "eval_crops": Rule(True, unless_schedule="plateau"),  # measures; plateau acts on it
  # The net and where it runs: checkpoints restore onto any mesh.
  "model": FIXED,
  "first_device": FREE,
  "model_parallelism": FREE,
  "num_devices": FREE,
  "dtype": FIXED,
  "ops_impl": FREE,  # equal up to rounding
  "cpu_compiler_options": FREE,  # equal up to rounding
  # Optimisation.
  "batch_size": FIXED,
  "num_epochs": STEP_COUNT,
  "num_train_steps": STEP_COUNT,
  "learning_rate": FIXED,
  "momentum": FIXED,
  "weight_decay": FIXED,
  "weight_decay_on_biases": FIXED,
  "lr_schedule": FIXED,
  "lr_boundaries_epochs": FIXED,
  "lr_decay_factor": FIXED,
  "warmup_epochs": FIXED,
  "warmup_start_factor": FIXED,
  "plateau_patience": FIXED,
  "plateau_max_drops": FIXED,
  "init_from": FREE,  # read only when a run starts, not on resume
  "freeze_all_but_last": FIXED,
  # The loop.
  "seed": FIXED,
  "log_every_steps": FREE,
  "eval_every_steps": FREE,
  "checkpoint_every_steps": FREE,
  "skip_nonfinite_steps": FREE,
  "keep_checkpoints": FREE,
}


@dataclasses.dataclass(frozen=True)
class Change:
  key: str  # dotted: model.lrn_k
  old: Any
  new: Any


@dataclasses.dataclass(frozen=True)
class Changes:
  """What a resumed config changes: `refused` breaks a rule, `applied` may change."""

  applied: list[Change]
  refused: list[Change]


def _plain(value: Any) -> Any:
  """A config value as JSON reads it back (tuples as lists, ConfigDicts as dicts)."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def _differences(old: Any, new: Any, key: str) -> list[Change]:
  """The leaves where new differs from old; a key the older config did not have is left out
  (the run that wrote it had no such setting)."""
  if isinstance(old, dict) and isinstance(new, dict):
    return [c for k in new if k in old for c in _differences(old[k], new[k], f"{key}.{k}")]
  return [] if same_setting(old, new) else [Change(key, old, new)]


def compare(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> Changes:
  """The keys config changes from the saved config of the run it resumes, sorted by rule; a
  key without a rule (a setting of the user's own) must match."""
  old, new = _plain(saved), _plain(config)
  schedule = old.get("lr_schedule", "")
  applied, refused = [], []
  for top in new:
    if top not in old:
      continue
    changes = _differences(old[top], new[top], top)
    fixed = RULES.get(top, FIXED).fixed(schedule)
    (refused if fixed else applied).extend(changes)
  return Changes(applied=applied, refused=refused)


def refusal(workdir: str, refused: list[Change]) -> str:
  """The one-line error for settings a resumed run may not change: which, and the way out."""
  changed = "; ".join(f"{c.key}={c.old!r}, not {c.new!r}" for c in refused)
  flags = " ".join(f"--config.{c.key}={_flag_value(c.old)}" for c in refused)
  return (
    f"workdir {workdir} holds checkpoints of a run with {changed}: a resumed run keeps those "
    f"settings: use a fresh --workdir (--config.init_from={workdir} starts from its "
    f"parameters), or that run's values: {flags}"
  )


def _flag_value(value: Any) -> str:
  if isinstance(value, list):
    return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


@dataclasses.dataclass(frozen=True)
class DataShape:
  """What identifies a run's data wherever it lies: its classes and split sizes."""

  classes: Sequence[str]
  train_images: int
  val_images: int

  @classmethod
  def of(cls, train: Any, val: Any) -> DataShape:
    return cls(classes=tuple(train.classes), train_images=len(train), val_images=len(val))

  @property
  def sizes(self) -> dict:
    return {"train_images": self.train_images, "val_images": self.val_images}


def record_data(workdir: str, data: DataShape) -> None:
  """WORKDIR/data.json: the split sizes (the classes are in classes.json)."""
  files.write_text(storage.join(workdir, DATA_FILE), json.dumps(data.sizes) + "\n")


def check_same_data(workdir: str, data_dir: str, data: DataShape) -> None:
  """data_dir may change on resume (the data moved), but must hold the data the run trained
  on: the same classes and split sizes as recorded (runs that did not record them pass)."""
  classes = class_names.read(workdir)
  if classes is not None and tuple(classes) != tuple(data.classes):
    differs = f"classes ({_class_difference(classes, data.classes)}, see classes.json)"
  else:
    path = storage.path(workdir).joinpath(DATA_FILE)
    if not path.exists():
      return
    recorded = json.loads(path.read_text())
    if recorded == data.sizes:
      return
    differs = f"sizes ({data.sizes}, not the run's {recorded})"
  raise UserInputError(
    f"the data in {data_dir or 'the default place'} is not the data workdir {workdir} was "
    f"trained on: its {differs}; set --config.data_dir to that run's data, or use a fresh "
    "--workdir"
  )


def _class_difference(recorded: Sequence[str], found: Sequence[str]) -> str:
  only_found = sorted(set(found) - set(recorded))[:3]
  only_recorded = sorted(set(recorded) - set(found))[:3]
  if not (only_found or only_recorded):
    return "the same names in another order"
  return f"new: {only_found}, missing: {only_recorded}"
