"""The whole job through train_and_evaluate: a real step, evaluation, checkpoints, resume,
meshes."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import params_of, small_config

from alexnet_jax.core.errors import UserInputError
from alexnet_jax.model import backend, sharding
from alexnet_jax.training import builders, checkpoints, class_names, metrics, train
from configs import default


def final_state(workdir, config):
  """The latest checkpoint's whole state, restored onto one device."""
  mgr = checkpoints.manager(workdir, config.keep_checkpoints)
  model = builders.create_model(config)
  tx = builders.create_optimizer(config, 1, 1)
  target = builders.abstract_state(
    model, tx, config.image_size, sharding.make_mesh(1, jax.devices()[:1])
  )
  restored = checkpoints.restore(mgr, target)
  mgr.close()
  return restored


def train_lines(workdir):
  return [r for r in metrics.read_metrics(workdir) if "train/loss" in r]


def initial_params(config):
  """The seeded parameters a run of `config` starts from, on one device."""
  state, _ = builders.initial_state(
    builders.create_model(config),
    builders.create_optimizer(config, 1, 1),
    config.image_size,
    config.seed,
    sharding.make_mesh(1, jax.devices()[:1]),
  )
  return jax.device_get(state.params)


def test_one_training_step_and_evaluation(trained_run, data_dir):
  """The shared 2-step run: metrics, tensorboard, config and a checkpoint of trained weights."""
  records = metrics.read_metrics(trained_run)
  assert [r["step"] for r in train_lines(trained_run)] == [1, 2]
  assert {"train/loss", "train/top1_error", "learning_rate", "images_per_sec"} <= set(records[0])
  evals = [r for r in records if "val/top1_error" in r]
  assert [r["step"] for r in evals] == [2]
  assert 0.0 <= evals[0]["val/top1_error"] <= 1.0 and evals[0]["val/loss"] > 0
  assert os.listdir(os.path.join(trained_run, "tensorboard"))
  assert json.load(open(os.path.join(trained_run, "config.json")))["model"]["variant"] == "paper"
  # What later readers need without the dataset: each line's epoch (80 images, batch 16: 5
  # steps an epoch) and the class names the labels index.
  assert [r["epoch"] for r in records] == [r["step"] / 5 for r in records]
  assert class_names.read(trained_run) == tuple(sorted(os.listdir(os.path.join(data_dir, "train"))))
  # The checkpoint holds trained parameters: they moved away from the seeded initialisation.
  config = small_config(data_dir)
  state = final_state(trained_run, config)
  assert int(state.step) == 2
  assert not np.allclose(state.params["fc8"]["kernel"], initial_params(config)["fc8"]["kernel"])


@pytest.mark.slow
def test_training_on_a_tower_mesh_matches_one_device(trained_run, tower_run, data_dir):
  """2 devices as a 1x2 mesh (one tower per device) train as the 2x1 data-parallel run: the
  same losses at both steps (step 2's after the first update) and the same parameters after
  both updates. The meshes sum the gradients in other orders (~1e-5 of the largest,
  test_sharding), and each step rounds the parameters to float32: runs that agree can
  differ by 1e-4 of what the steps changed plus one unit in the last place of the largest
  parameter per step."""
  towers, data = train_lines(tower_run), train_lines(trained_run)
  assert [r["step"] for r in towers] == [r["step"] for r in data] == [1, 2]
  for a, b in zip(towers, data):
    assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
  init = initial_params(small_config(data_dir))
  tower_params, data_params = params_of(tower_run), params_of(trained_run)
  for (path, a), b, w in zip(
    jax.tree_util.tree_leaves_with_path(tower_params),
    jax.tree.leaves(data_params),
    jax.tree.leaves(init),
  ):
    change = np.max(np.abs(b.astype(np.float64) - w))
    ulp = np.spacing(np.max(np.abs(b)))
    assert change > 0, sharding.path_str(path)  # trained: the check is not vacuous
    np.testing.assert_allclose(
      a, b, rtol=0, atol=1e-4 * change + 2 * ulp, err_msg=sharding.path_str(path)
    )


def test_a_changed_model_cannot_resume_a_workdir(copy_run, data_dir):
  workdir = copy_run()
  config = small_config(data_dir)
  config.model.dropout_rate = 0.3
  with pytest.raises(UserInputError, match="use a fresh --workdir"):
    train.train_and_evaluate(config, workdir)


def test_a_resume_with_another_batch_size_is_refused(copy_run, data_dir):
  workdir = copy_run()
  with pytest.raises(UserInputError, match="batch_size=16, not 32"):
    train.train_and_evaluate(small_config(data_dir, num_train_steps=4, batch_size=32), workdir)
  mgr = checkpoints.manager(workdir, 3)
  assert mgr.all_steps() == [2]  # nothing saved was touched
  mgr.close()


def test_data_problems_are_named_before_compiling(tmp_path):
  with pytest.raises(UserInputError, match="no prepared dataset at data_dir=.*alexnet_jax.prepare"):
    train.train_and_evaluate(default.get_config(), str(tmp_path / "w"))
  config = default.get_config()
  config.dataset, config.data_dir = "image_folder", str(tmp_path / "missing")
  with pytest.raises(UserInputError, match="does not exist"):
    train.train_and_evaluate(config, str(tmp_path / "w"))


def test_class_count_must_match_the_folders(tmp_path, data_dir):
  config = small_config(data_dir, num_classes=7)
  with pytest.raises(UserInputError, match="set --config.num_classes=10"):
    train.train_and_evaluate(config, str(tmp_path / "w"))


@pytest.mark.slow  # 18 s: the steps compiled once more
def test_the_configs_cpu_compiler_options_compile_the_steps(copy_run, data_dir, monkeypatch):
  """A run resumed with another set (a free change): its steps compile with that set."""
  asked, real = [], backend.compiler_options
  monkeypatch.setattr(
    backend,
    "compiler_options",
    lambda platform=None, cpu_set="auto": asked.append(cpu_set) or real(platform, cpu_set),
  )
  workdir = copy_run()
  config = small_config(data_dir, num_train_steps=3, cpu_compiler_options="no_ynnpack")
  train.train_and_evaluate(config, workdir)
  mgr = checkpoints.manager(workdir, 3)
  assert asked == ["no_ynnpack"] and mgr.latest_step() == 3
  mgr.close()
