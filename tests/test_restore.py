"""A checkpoint comes back on any mesh: written on 8 devices as 4x2, read on 1, 2x1 and 1x2,
and trained on; written from one device, read on eight."""

import os
import shutil

import jax
import numpy as np
from conftest import small_config

from alexnet_jax import checkpoints, metrics, sharding, train
from alexnet_jax.restore import restore


def mesh(data, model):
  return sharding.make_mesh(model, jax.devices()[: data * model])


def test_a_4x2_checkpoint_restores_on_1_2x1_and_1x2_and_trains_on(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(small_config(data_dir, model_parallelism=2), workdir)
  x = jax.random.normal(jax.random.key(0), (4, 67, 67, 3)) * 50
  logits = []
  for model, devices in ((1, 1), (1, 2), (2, 2)):
    r = restore(workdir, mesh=sharding.make_mesh(model, jax.devices()[:devices]))
    assert dict(r.params["conv1"]["kernel"].sharding.mesh.shape) == {
      "data": devices // model,
      "model": model,
    }
    logits.append(np.asarray(r.model.apply({"params": r.params}, x)))
  # Equal parameters, but the meshes sum the towers' and the batch's parts in other orders:
  # float32 rounding of logits of magnitude ~1, far below the 1e-4 allowed.
  scale = np.abs(logits[0]).max()
  for other in logits[1:]:
    np.testing.assert_allclose(other, logits[0], rtol=1e-4, atol=1e-4 * scale)
  train.train_and_evaluate(
    small_config(data_dir, num_train_steps=3, model_parallelism=2, num_devices=2), workdir
  )
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
