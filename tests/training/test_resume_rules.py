"""Resuming a workdir: which settings may change (applied, the previous config kept) and which
are refused in one line; damaged checkpoints skipped for the latest good one; moved data."""

import glob
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import small_config

from alexnet_jax.core.errors import UserInputError
from alexnet_jax.training import checkpoints, recipes, train
from configs import quickstart

# A setting of each kind that shapes what is computed, and a value other than quickstart's.
REFUSED = {
  "seed": 1,
  "learning_rate": 0.02,
  "weight_decay": 0.001,
  "weight_decay_on_biases": True,
  "lr_schedule": "piecewise",
  "lr_boundaries_epochs": (10,),
  "resize_size": 80,
  "pca_noise_std": 0.0,
  "dtype": "bfloat16",
  "model.lrn_k": 1.0,
  "dataset": "image_folder",
  "batch_size": 64,
  "freeze_all_but_last": 1,
}
# Settings of when and where things happen, with a new value.
APPLIED = {
  "log_every_steps": 7,
  "eval_every_steps": 10,
  "checkpoint_every_steps": 10,
  "keep_checkpoints": 5,
  "num_parallel_calls": 2,
  "num_devices": 4,
  "model_parallelism": 2,
  "data_dir": "/elsewhere",
}


def _quickstart(**changes):
  config = quickstart.get_config()
  for key, value in changes.items():
    parent, _, leaf = key.rpartition(".")
    (config[parent] if parent else config)[leaf] = value
  return config


def _flat_keys(config) -> set[str]:
  return set(config.to_dict())


def test_every_config_key_has_a_rule():
  """A new config key must be classified here: may it change on resume, or not?"""
  from alexnet_jax.training import resume_rules

  keys = _flat_keys(recipes.paper()) | _flat_keys(quickstart.get_config())
  assert keys - set(resume_rules.RULES) == set()


@pytest.mark.parametrize("key", REFUSED)
def test_a_setting_that_shapes_the_training_cannot_change_on_resume(tmp_path, key):
  """One line naming the key, its old and new values, and both ways out."""
  checkpoints.save_config(str(tmp_path), quickstart.get_config())
  old = _flat_get(quickstart.get_config(), key)
  with pytest.raises(UserInputError) as e:
    checkpoints.check_resumable(str(tmp_path), _quickstart(**{key: REFUSED[key]}))
  message = str(e.value)
  new = list(REFUSED[key]) if isinstance(REFUSED[key], tuple) else REFUSED[key]
  assert "\n" not in message
  assert f"{key}={old!r}, not {new!r}" in message
  assert "use a fresh --workdir" in message and f"--config.{key}=" in message


def _flat_get(config, key: str):
  for part in key.split("."):
    config = config[part]
  return list(config) if isinstance(config, tuple) else config


def test_a_refusal_names_every_changed_key(tmp_path):
  checkpoints.save_config(str(tmp_path), quickstart.get_config())
  changed = _quickstart(seed=3, learning_rate=0.5, log_every_steps=3)
  with pytest.raises(UserInputError, match="learning_rate=0.01, not 0.5; seed=0, not 3:") as e:
    checkpoints.check_resumable(str(tmp_path), changed)
  assert "log_every_steps" not in str(e.value)
  assert "--config.learning_rate=0.01 --config.seed=0" in str(e.value)


@pytest.mark.parametrize("key", APPLIED)
def test_a_setting_of_when_and_where_may_change_on_resume(tmp_path, key):
  checkpoints.save_config(str(tmp_path), quickstart.get_config())
  checkpoints.check_resumable(str(tmp_path), _quickstart(**{key: APPLIED[key]}))


def test_the_same_nan_setting_is_no_change(tmp_path):
  """NaN != NaN, yet a config that holds one resumes (tests poison the mean with NaN)."""
  checkpoints.save_config(str(tmp_path), _quickstart(channel_mean=(float("nan"),) * 3))
  checkpoints.check_resumable(str(tmp_path), _quickstart(channel_mean=(float("nan"),) * 3))


@pytest.mark.parametrize("schedule", ["constant", "piecewise", "plateau"])
def test_a_schedule_that_allows_it_resumes_with_more_steps(tmp_path, schedule):
  checkpoints.save_config(str(tmp_path), _quickstart(lr_schedule=schedule))
  checkpoints.check_resumable(str(tmp_path), _quickstart(lr_schedule=schedule, num_epochs=20))
  checkpoints.check_resumable(str(tmp_path), _quickstart(lr_schedule=schedule, num_train_steps=9))


def test_a_cosine_schedule_keeps_its_step_count(tmp_path):
  """The cosine decay spans the run: another total would change the rates behind it."""
  checkpoints.save_config(str(tmp_path), _quickstart(lr_schedule="cosine"))
  with pytest.raises(UserInputError, match="num_epochs=12, not 20"):
    checkpoints.check_resumable(str(tmp_path), _quickstart(lr_schedule="cosine", num_epochs=20))


def test_save_config_keeps_the_config_each_step_was_trained_with(tmp_path):
  """A resume at step 2 with changed settings keeps the previous config as config.2.json; a
  second resume at step 2 (the first trained nothing that was saved) keeps it as it was."""
  first, second, third = (_quickstart(log_every_steps=n) for n in (1, 2, 3))
  checkpoints.save_config(str(tmp_path), first)
  checkpoints.save_config(str(tmp_path), first, 2)
  assert not os.path.exists(tmp_path / "config.2.json")  # nothing changed: nothing kept
  checkpoints.save_config(str(tmp_path), second, 2)
  checkpoints.save_config(str(tmp_path), third, 2)
  assert json.loads((tmp_path / "config.2.json").read_text())["log_every_steps"] == 1
  assert json.loads((tmp_path / "config.json").read_text())["log_every_steps"] == 3


# Real runs: one with checkpoints at steps 1 and 2, copied by each test.


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, data_dir) -> str:
  workdir = str(tmp_path_factory.mktemp("two_checkpoints") / "run")
  train.train_and_evaluate(small_config(data_dir, checkpoint_every_steps=1), workdir)
  return workdir


@pytest.fixture
def run_copy(two_checkpoints, tmp_path) -> str:
  return str(shutil.copytree(two_checkpoints, tmp_path / "run"))


def _array_file(workdir: str, step: int) -> str:
  files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "**", "d", "*"), recursive=True)
  return max(files, key=os.path.getsize)


def _flip(path: str) -> None:
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(b"\xff" * 64)


def _cut(path: str) -> None:
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


DAMAGES = {"flipped": _flip, "cut": _cut}


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_resume_skips_a_damaged_latest_checkpoint(run_copy, data_dir, caplog, damage):
  """64 bytes of 0xFF in (or half of) step 2's array data: the resumed run warns naming
  steps 2 and 1, moves step 2 aside, resumes from 1 and trains step 2 again, to the same
  parameters as before."""
  before, _, _ = checkpoints.read_params(run_copy)
  DAMAGES[damage](_array_file(run_copy, 2))
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(small_config(data_dir, checkpoint_every_steps=1), run_copy)
  warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
  assert "checkpoints/2 is damaged" in warning and "using step 1 instead" in warning
  assert os.path.isdir(os.path.join(run_copy, checkpoints.DAMAGED_DIR, "2"))
  after, step, _ = checkpoints.read_params(run_copy)
  assert step == 2
  jax.tree.map(np.testing.assert_array_equal, after, before)


@pytest.mark.slow
def test_a_resume_with_every_checkpoint_damaged_is_one_line(run_copy, data_dir):
  for step in (1, 2):
    _flip(_array_file(run_copy, step))
  with pytest.raises(UserInputError, match="every checkpoint in .* is damaged") as e:
    train.train_and_evaluate(small_config(data_dir, checkpoint_every_steps=1), run_copy)
  assert "\n" not in str(e.value)


@pytest.mark.slow
def test_a_longer_run_is_applied_and_the_previous_config_kept(run_copy, data_dir):
  longer = small_config(data_dir, checkpoint_every_steps=1, num_train_steps=3, log_every_steps=3)
  train.train_and_evaluate(longer, run_copy)
  kept = json.load(open(os.path.join(run_copy, "config.2.json")))
  now = json.load(open(os.path.join(run_copy, "config.json")))
  assert (kept["num_train_steps"], kept["log_every_steps"]) == (2, 1)
  assert (now["num_train_steps"], now["log_every_steps"]) == (3, 3)
  assert checkpoints.read_params(run_copy)[1] == 3


@pytest.mark.slow
def test_moved_data_resumes_and_other_data_is_refused(run_copy, data_dir, tmp_path):
  """data_dir may change when the data moved; data of other classes or sizes is refused."""
  moved = str(shutil.copytree(data_dir, tmp_path / "moved"))
  config = small_config(moved, checkpoint_every_steps=1, num_train_steps=3)
  train.train_and_evaluate(config, run_copy)
  other = str(shutil.copytree(data_dir, tmp_path / "other"))
  os.remove(sorted(glob.glob(os.path.join(other, "val", "*", "*")))[0])
  with pytest.raises(UserInputError, match="is not the data workdir .* was trained on: its sizes"):
    train.train_and_evaluate(small_config(other, num_train_steps=4), run_copy)
