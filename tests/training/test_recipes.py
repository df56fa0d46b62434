"""The configs the package knows: the paper's has a key for every setting of the net, the
config files are the package's recipes, and each published net's config is a valid run."""

import pytest

from alexnet_jax.model import settings
from alexnet_jax.training import recipes
from alexnet_jax.training.config_check import check_config
from alexnet_jax.weights import layouts
from configs import caffe_alexnet, default, torchvision_alexnet


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
