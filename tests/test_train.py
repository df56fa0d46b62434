"""The whole job through train_and_evaluate: a real step, evaluation, checkpoints, resume, meshes."""

import json
import os

import jax
import numpy as np
import pytest

from alexnet_jax import builders, checkpoints, metrics, sharding, train
from alexnet_jax.config_check import check_config
from alexnet_jax.errors import UserInputError
from configs import default, quickstart


def small_config(data_dir, **overrides):
  config = quickstart.get_config()
  config.data_dir = data_dir
  config.synthetic_train_per_class = 4
  config.synthetic_val_per_class = 2
  config.batch_size = 16
  config.num_train_steps = 2
  config.log_every_steps = 1
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  for key, value in overrides.items():
    config[key] = value
  return config


def final_params(workdir, config):
  """The latest checkpoint's parameters, restored onto one device."""
  mgr = checkpoints.manager(workdir, config.keep_checkpoints)
  model = builders.create_model(config)
  tx = builders.create_optimizer(config, 1, 1)
  target = builders.abstract_state(
    model, tx, config.image_size, sharding.make_mesh(1, jax.devices()[:1])
  )
  restored = checkpoints.restore(mgr, target)
  mgr.close()
  return restored


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("shapes"))


def test_one_training_step_and_evaluation(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  config = small_config(data_dir)
  result = train.train_and_evaluate(config, workdir)
  assert set(result) == {"val/loss", "val/top1_error", "val/top5_error"}
  assert 0.0 <= result["val/top1_error"] <= 1.0 and result["val/loss"] > 0
  records = metrics.read_metrics(workdir)
  train_lines = [r for r in records if "train/loss" in r]
  assert [r["step"] for r in train_lines] == [1, 2]
  assert {"train/loss", "train/top1_error", "learning_rate", "images_per_sec"} <= set(
    train_lines[0]
  )
  assert [r["step"] for r in records if "val/top1_error" in r] == [2]
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert json.load(open(os.path.join(workdir, "config.json")))["model"]["variant"] == "paper"
  # The checkpoint holds trained parameters: they moved away from the seeded initialisation.
  state = final_params(workdir, config)
  assert int(state.step) == 2
  init, _ = builders.initial_state(
    builders.create_model(config),
    builders.create_optimizer(config, 1, 1),
    config.image_size,
    config.seed,
    sharding.make_mesh(1, jax.devices()[:1]),
  )
  assert not np.allclose(state.params["fc8"]["kernel"], init.params["fc8"]["kernel"])


def test_resume_continues_from_the_saved_step(tmp_path, data_dir):
  resumed, straight = str(tmp_path / "resumed"), str(tmp_path / "straight")
  # A schedule that does not depend on the run's length, so that 2 + 2 steps equal 4.
  train.train_and_evaluate(small_config(data_dir, lr_schedule="constant"), resumed)
  config = small_config(data_dir, num_train_steps=4, lr_schedule="constant")
  train.train_and_evaluate(config, resumed)
  train.train_and_evaluate(config, straight)
  assert [r["step"] for r in metrics.read_metrics(resumed) if "train/loss" in r] == [1, 2, 3, 4]
  a, b = final_params(resumed, config), final_params(straight, config)
  assert int(a.step) == int(b.step) == 4
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(x, y)  # same batches, same dropout: bit-identical


def test_training_on_a_tower_mesh_matches_one_device(tmp_path, data_dir):
  """8 simulated devices as a 4x2 mesh give the first step's loss of a 1x1 run."""
  config = small_config(data_dir, num_train_steps=1, eval_every_steps=1, checkpoint_every_steps=1)
  train.train_and_evaluate(config, str(tmp_path / "mesh"))
  sharded = metrics.read_metrics(str(tmp_path / "mesh"))[0]
  assert sharded["step"] == 1
  config.model_parallelism = 2
  train.train_and_evaluate(config, str(tmp_path / "mesh42"))
  towers = metrics.read_metrics(str(tmp_path / "mesh42"))[0]
  assert towers["train/loss"] == pytest.approx(sharded["train/loss"], rel=1e-5)


def test_a_changed_model_cannot_resume_a_workdir(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(
    small_config(data_dir, num_train_steps=1, eval_every_steps=1, checkpoint_every_steps=1), workdir
  )
  config = small_config(data_dir)
  config.model.dropout_rate = 0.3
  with pytest.raises(UserInputError, match="use a fresh --workdir"):
    train.train_and_evaluate(config, workdir)


@pytest.mark.parametrize(
  "change, message",
  [
    ({"dataset": "cifar"}, "unknown dataset 'cifar'"),
    ({"batch_size": 12}, "batch_size=12 does not divide over the 8 data-parallel devices"),
    ({"model_parallelism": 3}, "model_parallelism=3"),
    ({"lr_schedule": "step"}, "unknown lr_schedule 'step'"),
    ({"image_size": 40, "resize_size": 48}, "image_size=40"),
    ({"resize_size": 60}, "resize_size=60 is smaller than the crop"),
    ({"dtype": "float16"}, "unknown dtype 'float16'"),
    ({"ops_impl": "cudnn"}, "unknown ops_impl 'cudnn'; choose one of"),
    ({"dataset": "image_folder", "data_dir": ""}, "needs --config.data_dir"),
  ],
)
def test_bad_config_values_are_named(change, message):
  config = quickstart.get_config()
  for key, value in change.items():
    config[key] = value
  with pytest.raises(UserInputError, match=message):
    check_config(config)


def test_ops_impl_reaches_the_model_and_old_workdirs_get_the_default():
  config = quickstart.get_config()
  assert builders.create_model(config).ops_impl == "fast"
  config.ops_impl = "plain"
  assert builders.create_model(config).ops_impl == "plain"
  del config["ops_impl"]  # a config.json written before the option existed
  assert builders.create_model(config).ops_impl == "fast"


def test_bad_model_values_are_named():
  config = quickstart.get_config()
  config.model.variant = "vgg"
  with pytest.raises(UserInputError, match="unknown variant 'vgg'"):
    check_config(config)
  config = quickstart.get_config()
  config.model.variant, config.model.towers, config.model_parallelism = "torchvision", 1, 2
  with pytest.raises(UserInputError, match="set --config.model_parallelism=1"):
    check_config(config)


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
