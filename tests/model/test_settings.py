"""`config.model` holds AlexNet's fields: any other key is named, and the few translations
(ops_impl "auto", dtype names, towers under the torchvision variant) happen in one place."""

import jax.numpy as jnp
import pytest

from alexnet_jax.model import settings
from alexnet_jax.model.alexnet import AlexNet


def test_the_settings_are_alexnets_fields_but_those_a_run_sets():
  names = settings.names()
  assert names[:2] == ("variant", "towers") and "lrn_scope" in names
  assert not {"num_classes", "mesh", "dtype", "ops_impl", "parent", "name"} & set(names)
  assert set(settings.TRAINING_ONLY) <= set(names)


def test_settings_become_the_modules_fields():
  fields = settings.alexnet_fields({"variant": "paper", "lrn_k": 1.0}, "bfloat16", "auto")
  assert fields == {"variant": "paper", "lrn_k": 1.0, "dtype": jnp.bfloat16, "ops_impl": "fast"}
  model = AlexNet(**settings.alexnet_fields({"variant": "torchvision", "towers": 2}))
  assert model.arch.towers == 1  # a paper config switched to torchvision keeps its towers=2


def test_an_unknown_setting_is_named():
  with pytest.raises(ValueError, match="unknown model setting.* lrn_size; AlexNet's are variant"):
    settings.alexnet_fields({"variant": "paper", "lrn_size": 5})
