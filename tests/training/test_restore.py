"""A checkpoint comes back on any mesh: written on a 1x2 tower mesh, read on 1, 2x1 and 4x2
devices and trained on on one; written from one device, read on eight."""

import os
import shutil

import jax
import numpy as np
import pytest
from conftest import apply, assert_close, small_config

from alexnet_jax.model import sharding
from alexnet_jax.training import checkpoints, metrics, train
from alexnet_jax.training.restore import restore


def mesh(data, model):
  return sharding.make_mesh(model, jax.devices()[: data * model])


@pytest.mark.slow
def test_a_tower_checkpoint_restores_on_1_2x1_and_4x2_and_trains_on(tower_run, copy_run, data_dir):
  workdir = copy_run(source=tower_run)
  x = jax.random.normal(jax.random.key(0), (4, 67, 67, 3)) * 50
  logits = []
  for model, devices in ((1, 1), (1, 2), (2, 8)):
    r = restore(workdir, mesh=sharding.make_mesh(model, jax.devices()[:devices]))
    assert dict(r.params["conv1"]["kernel"].sharding.mesh.shape) == {
      "data": devices // model,
      "model": model,
    }
    logits.append(np.asarray(apply(r.model, {"params": r.params}, x)))
  for other in logits[1:]:  # equal parameters; other meshes, other sum orders
    assert_close(other, logits[0], rtol=1e-5)
  train.train_and_evaluate(small_config(data_dir, num_train_steps=3, num_devices=1), workdir)
  assert [r["step"] for r in metrics.read_metrics(workdir) if "train/loss" in r] == [1, 2, 3]


def test_a_one_device_checkpoint_restores_on_eight(trained_run, tmp_path):
  """Parameters saved from one device come back on a 4x2 mesh, equal."""
  one = restore(trained_run, mesh=mesh(1, 1))
  workdir = tmp_path / "one"
  mgr = checkpoints.manager(str(workdir), keep=1)
  checkpoints.save(mgr, 5, {"params": one.params})
  mgr.wait_until_finished()
  mgr.close()
  shutil.copy(os.path.join(trained_run, checkpoints.CONFIG_FILE), workdir)
  eight = restore(str(workdir), mesh=mesh(4, 2))
  assert eight.step == 5
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
