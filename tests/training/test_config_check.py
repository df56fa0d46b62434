"""Bad config values are one-line errors, found before any data is read or anything compiled."""

import pytest

from alexnet_jax.core.errors import UserInputError
from alexnet_jax.model import backend
from alexnet_jax.training import builders
from alexnet_jax.training.config_check import check_config
from configs import quickstart


@pytest.mark.parametrize(
  "change, message",
  [
    ({"dataset": "cifar"}, "unknown dataset 'cifar'.*or tfds:NAME"),
    ({"dataset": "tfds:"}, "unknown dataset 'tfds:'.*or tfds:NAME"),
    ({"dataset": "tfds:mnist", "stats_images": 0}, "stats_images=0"),
    ({"batch_size": 12}, "batch_size=12 does not divide over the 8 data-parallel devices"),
    ({"batch_size": -4}, "batch_size=-4 must be positive"),
    ({"batch_size": 0}, "batch_size=0 must be positive"),
    ({"learning_rate": float("inf")}, "learning_rate=inf must be a positive finite number"),
    ({"learning_rate": 0.0}, "learning_rate=0.0 must be a positive finite number"),
    ({"momentum": 1.0}, r"momentum=1.0 must be in \[0, 1\)"),
    ({"model_parallelism": 3}, "model_parallelism=3"),
    ({"lr_schedule": "step"}, "unknown lr_schedule 'step'"),
    ({"image_size": 40, "resize_size": 48}, "image_size=40"),
    ({"resize_size": 60}, "resize_size=60 is smaller than the crop"),
    ({"dtype": "float16"}, "unknown dtype 'float16'"),
    (
      {"cpu_compiler_options": "fast"},
      "unknown cpu_compiler_options 'fast'; set --config.cpu_compiler_options to one of",
    ),
    ({"ops_impl": "cudnn"}, "unknown ops_impl 'cudnn'; choose one of"),
    ({"dataset": "image_folder", "data_dir": ""}, "needs --config.data_dir"),
    ({"log_every_steps": 0}, "log_every_steps=0 must be at least 1"),
    ({"eval_crops": 5}, "eval_crops=5"),
  ],
)
def test_bad_config_values_are_named(change, message):
  config = quickstart.get_config()
  for key, value in change.items():
    config[key] = value
  with pytest.raises(UserInputError, match=message) as error:
    check_config(config)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("variant", "vgg", "unknown variant 'vgg'"),
    ("activation", "gelu", "unknown activation 'gelu'"),
    ("dropout_rate", 1.0, r"dropout_rate=1.0 must be in \[0, 1\)"),
    ("lrn_scope", "gpu", "unknown lrn_scope 'gpu'"),
    ("towers", 3, "towers=3 is not supported"),
  ],
)
def test_bad_model_values_are_named_by_the_model_itself(key, value, message):
  config = quickstart.get_config()
  config.model[key] = value
  with pytest.raises(UserInputError, match=message):
    check_config(config)
  with pytest.raises(ValueError, match=message):  # the same words from the model's own check
    builders.create_model(config)


def test_an_unknown_model_setting_is_one_line_naming_it():
  config = quickstart.get_config()
  config.model.lrn_size = 5
  with pytest.raises(UserInputError, match="unknown model setting.* lrn_size;") as error:
    check_config(config)
  assert "\n" not in str(error.value)


def test_two_towers_split_only_where_there_are_two():
  config = quickstart.get_config()
  config.model.variant, config.model.towers, config.model_parallelism = "torchvision", 1, 2
  with pytest.raises(UserInputError, match="set --config.model_parallelism=1"):
    check_config(config)
  config.model.variant, config.model.towers = "paper", 2
  check_config(config)  # 8 devices: a 4x2 mesh


def test_ops_impl_reaches_the_model_and_old_workdirs_get_the_default():
  config = quickstart.get_config()
  assert builders.create_model(config).ops_impl == "fast"  # "auto", on the CPU
  assert backend.default_ops_impl("cpu") == "fast" and backend.default_ops_impl("gpu") == "plain"
  config.ops_impl = "plain"
  assert builders.create_model(config).ops_impl == "plain"
  del config["ops_impl"]  # a config.json written before the option existed
  assert builders.create_model(config).ops_impl == "fast"
