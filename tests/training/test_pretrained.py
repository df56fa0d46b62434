"""Fine-tuning: `--config.init_from` (weights files and checkpoints of ours), a fresh fc8 for
another class count, frozen layers, and resume taking precedence."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
  paper_params,
  params_of,
  random_caffe,
  random_params,
  random_torchvision,
  small_config,
)

from alexnet_jax.core.errors import UserInputError
from alexnet_jax.model import sharding
from alexnet_jax.model.alexnet import LAYERS
from alexnet_jax.training import builders, checkpoints, optim, pretrained, train
from alexnet_jax.training.config_check import check_config
from alexnet_jax.training.restore import restore
from alexnet_jax.weights import layouts, readers
from configs import quickstart

TRUNK = LAYERS[:-1]  # conv1 ... fc7


def initial_state(config):
  mesh = sharding.make_mesh(config.model_parallelism)
  return builders.initial_state(
    builders.create_model(config, mesh),
    builders.create_optimizer(config, 1, 1),
    config.image_size,
    config.seed,
    mesh,
  )[0]


@pytest.fixture(scope="module")
def fresh():
  """Fresh parameters of a quickstart run (the paper net, 67x67 crops, 10 classes), sharded as
  a run's on 2 devices: numpy draws put in place (no initialisation to compile)."""
  config = quickstart.get_config()
  mesh = sharding.make_mesh(config.model_parallelism, jax.devices()[:2])
  model = builders.create_model(config, mesh)
  tx = builders.create_optimizer(config, 1, 1)
  target = builders.abstract_state(model, tx, config.image_size, mesh).params
  placement = jax.tree.map(lambda leaf: leaf.sharding, target)
  return jax.device_put(random_params(model, config.image_size), placement)


def grouped_file(path, num_classes, side=67, seed=1):
  params = paper_params(side, num_classes=num_classes, seed=seed)
  readers.write_state_dict(layouts.to_torch_grouped(params), str(path))
  return params


def assert_layers_equal(a, b, names):
  for name in names:
    for p in ("kernel", "bias"):
      np.testing.assert_array_equal(
        np.asarray(a[name][p]), np.asarray(b[name][p]), err_msg=f"{name}/{p}"
      )


def test_frozen_layers_get_no_update():
  params = {name: {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)} for name in LAYERS}
  grads = jax.tree.map(jnp.ones_like, params)
  assert optim.frozen_layers(2) == LAYERS[:6] and optim.frozen_layers(0) == ()
  config = quickstart.get_config()
  config.freeze_all_but_last = 2
  tx = builders.create_optimizer(config, 10, 100)
  updates, _ = tx.update(grads, tx.init(params), params)
  for name in LAYERS:  # weight decay included: frozen weights do not move at all
    moved = any(np.any(np.asarray(u) != 0) for u in jax.tree.leaves(updates[name]))
    assert moved == (name in ("fc7", "fc8")), name
  # One optimizer-state structure whatever is frozen: a checkpoint restores under any setting.
  config.freeze_all_but_last = 0
  assert jax.tree.structure(tx.init(params)) == jax.tree.structure(
    builders.create_optimizer(config, 10, 100).init(params)
  )


def test_frozen_layers_gather_no_momentum():
  """A resume that unfreezes a layer starts it from rest: its first update is one step's
  alone, not the momentum of every step it sat out frozen."""
  params = {name: {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)} for name in LAYERS}
  grads = jax.tree.map(jnp.ones_like, params)
  config = quickstart.get_config()
  config.freeze_all_but_last, config.lr_schedule = 2, "constant"
  tx = builders.create_optimizer(config, 10, 100)
  opt_state = tx.init(params)
  for _ in range(3):
    _, opt_state = tx.update(grads, opt_state, params)
  momentum = optax.tree_utils.tree_get(opt_state, "trace")
  for name in LAYERS:
    gathered = any(np.any(np.asarray(v) != 0) for v in jax.tree.leaves(momentum[name]))
    assert gathered == (name in ("fc7", "fc8")), name
  config.freeze_all_but_last = 0
  updates, _ = builders.create_optimizer(config, 10, 100).update(grads, opt_state, params)
  lr, wd = config.learning_rate, config.weight_decay
  np.testing.assert_array_equal(updates["conv1"]["bias"], np.float32(-lr) * grads["conv1"]["bias"])
  np.testing.assert_allclose(updates["conv1"]["kernel"], -lr * (1 + wd), rtol=1e-6)


def test_init_from_a_file_loads_all_but_fc8(tmp_path, fresh, caplog):
  path = tmp_path / "alexnet.npz"
  source = grouped_file(path, num_classes=5)
  config = quickstart.get_config()
  config.init_from = str(path)
  with caplog.at_level(logging.INFO):
    params = pretrained.init_params(config, fresh)
  assert_layers_equal(params, source, TRUNK)
  assert_layers_equal(params, fresh, ["fc8"])
  assert "fc8 freshly initialised for 10 classes (the weights have 5)" in caplog.text
  assert all(
    a.sharding == b.sharding for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(fresh))
  )


def test_init_from_a_checkpoint_reads_only_its_params(tmp_path, fresh):
  """Whatever optimizer wrote it: only the parameters are read."""
  workdir = str(tmp_path / "run")
  source = paper_params(67, num_classes=10, seed=2)
  mgr = checkpoints.manager(workdir, 3)
  checkpoints.save(
    mgr, 7, {"step": np.int32(7), "params": source, "opt_state": {"other": np.zeros(3)}}
  )
  mgr.wait_until_finished()
  mgr.close()
  checkpoints.save_config(workdir, quickstart.get_config())
  config = quickstart.get_config()
  for where in (workdir, f"{workdir}/checkpoints", f"{workdir}/checkpoints/7"):
    config.init_from = where
    assert_layers_equal(pretrained.init_params(config, fresh), source, LAYERS)


def test_mismatched_weights_are_named(tmp_path, fresh):
  config = quickstart.get_config()
  config.init_from = str(tmp_path / "torchvision.npz")
  readers.write_state_dict(random_torchvision(np.random.default_rng(0)), config.init_from)
  with pytest.raises(
    UserInputError, match="holds a 'torchvision' AlexNet .* set --config.model.variant=torchvision"
  ):
    pretrained.init_params(config, fresh)
  config.init_from = str(tmp_path / "99.npz")
  grouped_file(config.init_from, num_classes=10, side=99)
  with pytest.raises(
    UserInputError, match=r"fc6 \(2, 1024, 2048\) \(this run: \(2, 256, 2048\)\).*image_size"
  ):
    pretrained.init_params(config, fresh)
  with pytest.raises(UserInputError, match="has no checkpoints/: train first"):
    checkpoints.read_params(str(tmp_path))


def test_init_from_names_the_settings_the_weights_were_trained_with(tmp_path, fresh, caplog):
  """Caffe's weights in the paper's per-tower LRN: the settings that change what they compute
  are named; Caffe's biases (only initialisation) are not."""
  config = quickstart.get_config()
  config.init_from, config.model.bias_one = str(tmp_path / "bvlc_alexnet.npy"), 1.0
  layers = random_caffe(np.random.default_rng(0), side=1, num_classes=10)
  np.save(config.init_from, layers, allow_pickle=True)
  with caplog.at_level(logging.WARNING):
    pretrained.init_params(config, fresh)
  warning = next(r.getMessage() for r in caplog.records if "trained with" in r.getMessage())
  assert "'lrn_scope': 'all'" in warning and "'lrn_k': 1.0" in warning
  assert "'lrn_scope': 'tower'" in warning and "bias_one" not in warning
  assert "lrn_n" not in warning  # Caffe's n is the paper's


@pytest.mark.parametrize(
  "change, message",
  [
    (
      {"init_from": "/nonexistent/alexnet.pth"},
      "init_from='/nonexistent/alexnet.pth' does not exist",
    ),
    ({"init_from": __file__}, "unknown weights format"),
    ({"freeze_all_but_last": 9}, "freeze_all_but_last=9 must be between 0"),
  ],
)
def test_bad_fine_tuning_values_are_named(change, message):
  config = quickstart.get_config()
  config.update(change)
  with pytest.raises(UserInputError, match=message):
    check_config(config)
  config = quickstart.get_config()
  config.model.lrn_scope = "gpu"
  with pytest.raises(UserInputError, match="unknown lrn_scope 'gpu'"):
    check_config(config)


@pytest.mark.slow
def test_fine_tuning_trains_only_the_last_layer_and_resume_wins(tmp_path, monkeypatch, data_dir):
  path = tmp_path / "alexnet.npz"
  source = grouped_file(path, num_classes=5)
  config = small_config(data_dir, init_from=str(path), freeze_all_but_last=1)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  assert restore(workdir).step == 2
  params = params_of(workdir)
  assert_layers_equal(params, source, TRUNK)  # frozen: not a bit moved
  assert not np.allclose(params["fc8"]["kernel"], initial_state(config).params["fc8"]["kernel"])
  # The run's own checkpoint takes precedence over init_from.
  monkeypatch.setattr(pretrained, "init_params", lambda *_: pytest.fail("init_from read on resume"))
  config.num_train_steps = 3
  train.train_and_evaluate(config, workdir)
  assert restore(workdir).step == 3


def test_init_from_refuses_nonfinite_weights(tmp_path, fresh):
  """A file or a checkpoint holding NaN or Inf: one line naming the tensors, before the run
  starts."""
  params = paper_params(67, num_classes=10, seed=3)
  params["conv2"]["kernel"][0, 0, 0, 0, 0] = np.nan
  config = quickstart.get_config()
  config.init_from = str(tmp_path / "alexnet.npz")
  readers.write_state_dict(layouts.to_torch_grouped(params), config.init_from)
  with pytest.raises(UserInputError, match=r"NaN or Inf values in conv2.weight;"):
    pretrained.init_params(config, fresh)
  config.init_from = str(tmp_path / "run")
  mgr = checkpoints.manager(config.init_from, 3)
  checkpoints.save(mgr, 4, {"step": np.int32(4), "params": params})
  mgr.wait_until_finished()
  mgr.close()
  with pytest.raises(
    UserInputError,
    match=r"^refusing checkpoint .*run/checkpoints/4: NaN or Inf values in "
    r"conv2/kernel; take",
  ):
    pretrained.init_params(config, fresh)
