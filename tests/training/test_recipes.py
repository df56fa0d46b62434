"""The configs the package knows: the paper's has a key for every setting of the net, the
config files are the package's recipes, each published net's config is a valid run, and the
hardware recipes divide their batch as they say and reduce to the paper's schedule on one
device."""

import importlib.util
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from alexnet_jax.core.errors import UserInputError
from alexnet_jax.model import settings
from alexnet_jax.training import builders, optim, recipes
from alexnet_jax.training.config_check import check_config
from alexnet_jax.weights import layouts
from configs import caffe_alexnet, default, gpu8, torchvision_alexnet, tpu_pod


def test_the_papers_model_settings_are_the_nets_fields():
  """A new field of AlexNet gets its key in the paper's config, and no key is left over."""
  assert set(recipes.paper().model) == set(settings.names())


def test_the_config_files_are_the_packages_recipes():
  assert default.get_config() == recipes.paper()
  assert caffe_alexnet.get_config() == recipes.published("caffe")
  assert torchvision_alexnet.get_config() == recipes.published("torchvision")


@pytest.mark.parametrize("fmt", layouts.FORMATS)
def test_each_published_net_runs_with_what_it_was_trained_with(fmt):
  config = recipes.published(fmt)
  assert {k: config.model[k] for k in recipes.trained_with(fmt)} == recipes.trained_with(fmt)
  check_config(config)


# The hardware recipes: configs/gpu8.py and configs/tpu_pod.py, built by recipes.scaled.

ROOT = pathlib.Path(__file__).resolve().parents[2]
IMAGENET_TRAIN = 1_281_167


def _schedule_rates(config) -> np.ndarray:
  """The rate at every step of the config's ImageNet run, as training builds its schedule."""
  steps_per_epoch = IMAGENET_TRAIN // config.batch_size
  total = config.num_epochs * steps_per_epoch
  schedule = optim.make_schedule(
    config.lr_schedule,
    config.learning_rate,
    steps_per_epoch,
    total,
    tuple(config.lr_boundaries_epochs),
    config.lr_decay_factor,
    config.warmup_epochs,
    config.warmup_start_factor,
  )
  return np.asarray(schedule(jnp.arange(total + 1)))


@pytest.mark.parametrize("devices", [1, 2, 8, 32, 64])
@pytest.mark.parametrize("warmup", [0, 5])
def test_scaled_divides_its_batch_and_scales_the_rate_linearly(devices, warmup):
  config = recipes.scaled(devices, per_device_batch=128, warmup_epochs=warmup)
  assert config.batch_size == devices * 128
  assert config.learning_rate == pytest.approx(0.01 * devices)  # k = devices at 128 a device
  assert config.warmup_start_factor * config.learning_rate == pytest.approx(0.01)
  check_config(config, num_devices=devices, process_count=max(1, devices // 8))


def test_the_gpu_node_is_eight_gpus_at_128_with_eight_times_the_rate():
  config = gpu8.get_config()
  assert (config.batch_size, config.learning_rate, config.warmup_epochs) == (1024, 0.08, 0)
  assert config.dtype == "bfloat16" and config.dataset == "prepared"
  check_config(config, num_devices=8, process_count=1)
  four = gpu8.get_config("4")
  assert (four.batch_size, four.learning_rate) == (512, 0.04)


@pytest.mark.parametrize("chips", [8, 32, 64, 256])
def test_the_pod_batch_grows_with_the_slice_and_warms_up_from_the_papers_rate(chips):
  config = tpu_pod.get_config(str(chips))
  assert config.batch_size == 128 * chips and config.batch_size // chips == 128
  assert config.learning_rate == pytest.approx(0.01 * chips)
  rates = _schedule_rates(config)
  steps_per_epoch = IMAGENET_TRAIN // config.batch_size
  assert rates[0] == pytest.approx(0.01)  # Goyal et al.: from rate / k ...
  assert rates[5 * steps_per_epoch] == pytest.approx(0.01 * chips)  # ... to rate after 5 epochs
  assert np.all(np.diff(rates[: 5 * steps_per_epoch + 1]) > 0)  # rising every step
  assert rates[30 * steps_per_epoch] == pytest.approx(0.001 * chips)  # the paper's drop, in place
  check_config(config, num_devices=chips, process_count=max(1, chips // 8))


@pytest.mark.parametrize("recipe", [gpu8, tpu_pod])
@pytest.mark.parametrize("arg", ["v5e", "0", "-8"])
def test_a_device_count_that_is_not_one_is_one_line(recipe, arg):
  with pytest.raises(UserInputError, match=f"{arg}: give the number of devices after ':'"):
    recipe.get_config(arg)


@pytest.mark.parametrize("recipe", [gpu8, tpu_pod])
def test_at_one_device_each_recipe_is_the_papers_schedule_exactly(recipe):
  """At K=1 (batch 128) the rate at every step of 90 epochs equals paper()'s, bit for bit: the
  pod's 5-epoch warmup runs from the paper's rate to the paper's rate."""
  config, paper = recipe.get_config("1"), recipes.paper()
  assert config.batch_size == paper.batch_size == 128
  np.testing.assert_array_equal(_schedule_rates(config), _schedule_rates(paper))


def test_the_optimizer_training_builds_starts_the_pods_warmup_at_the_papers_rate():
  config = tpu_pod.get_config()
  tx = builders.create_optimizer(config, steps_per_epoch=100, total_steps=9000)
  params = {"fc8": {"kernel": jnp.zeros((2, 2))}}
  state = tx.init(params)
  rates = []
  for _ in range(3):
    _, state = tx.update(params, state, params)
    rates.append(float(state.hyperparams["learning_rate"]))
  # Rising from 0.01 over 500 steps to 0.32: 0.01 + 0.31 * step / 500 (optax's count lags one).
  assert rates == pytest.approx([0.01 + 0.31 * s / 500 for s in (0, 1, 2)], rel=1e-5)


@pytest.mark.parametrize(
  "change, message",
  [
    ({"warmup_epochs": -1}, r"warmup_epochs=-1.0 must be >= 0"),
    ({"warmup_epochs": 30}, r"less than the first rate drop \(lr_boundaries_epochs=\(30, 60, 80\)"),
    ({"lr_schedule": "plateau", "warmup_epochs": 5}, "warmup_epochs needs a schedule"),
    ({"warmup_start_factor": 1.5}, r"warmup_start_factor=1.5 must be in \[0, 1\]"),
  ],
)
def test_bad_warmups_are_one_line(change, message):
  config = recipes.paper()
  config.update(change)
  with pytest.raises(UserInputError, match=message):
    check_config(config, num_devices=1, process_count=1)


CONFIG_FILES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("[!_]*.py"))


@pytest.mark.parametrize("path", CONFIG_FILES + ["configs/gpu8.py:4", "configs/tpu_pod.py:64"])
def test_every_config_file_loads_through_the_config_flag_and_checks_out(path):
  """What `--config=configs/X.py[:COUNT]` gives main: the file loads through ml_collections'
  flag, and the config passes check_config on the 8 simulated devices."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values)
  values(["main", f"--config={ROOT / path}"])
  assert values.config.batch_size > 0
  check_config(values.config)


def test_the_hardware_page_shows_what_host_needs_computes():
  """docs/hardware.md's tables are benchmarks/host_needs.py's, so the page cannot drift."""
  spec = importlib.util.spec_from_file_location("host_needs", ROOT / "benchmarks/host_needs.py")
  host_needs = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(host_needs)
  assert host_needs.markdown() in (ROOT / "docs/hardware.md").read_text()
