"""Published weights into a workdir of ours and back out (`python -m alexnet_jax.convert`):
the checkpoint training restores, the config the weights run with, one-line errors, and the
command working wherever it runs."""

import importlib
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import Exploit, assert_trees_equal, paper_params, random_caffe

from alexnet_jax.core.errors import UserInputError
from alexnet_jax.model import sharding
from alexnet_jax.training import builders, checkpoints, published
from alexnet_jax.weights import layouts, readers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def restore_train_state(workdir):
  """The whole TrainState of workdir's latest checkpoint, as `--mode=eval` and resuming restore
  it."""
  config = checkpoints.load_config(workdir)
  mesh = sharding.make_mesh(1)
  target = builders.abstract_state(
    builders.create_model(config, mesh),
    builders.create_optimizer(config, 1, 1),
    config.image_size,
    mesh,
  )
  mgr = checkpoints.manager(workdir, config.keep_checkpoints)
  state = checkpoints.restore(mgr, target)
  mgr.close()
  return config, state


def convert(args, cwd, pythonpath):
  return subprocess.run(
    [sys.executable, "-m", "alexnet_jax.convert", *args],
    cwd=cwd,
    env=os.environ | {"PYTHONPATH": pythonpath},
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_command_line_prints_one_line_errors(tmp_path):
  path = str(tmp_path / "bvlc_alexnet.npy")
  np.save(path, {"conv1": [Exploit(tmp_path / "pwned"), 0]}, allow_pickle=True)
  run = convert([f"--input={path}", f"--output={tmp_path / 'o'}"], REPO, REPO)
  assert run.returncode != 0
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith("error: refusing") and "Traceback" not in run.stderr
  assert not (tmp_path / "pwned").exists() and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_convert_needs_only_the_package(tmp_path):
  """As installed: the package alone on the path (no configs/ beside it), run from elsewhere.
  The config written beside the weights comes from the package."""
  site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
  site.mkdir(), elsewhere.mkdir()
  (site / "alexnet_jax").symlink_to(os.path.join(REPO, "alexnet_jax"))
  params = paper_params(67, num_classes=3)
  readers.write_state_dict(layouts.to_torch_grouped(params), str(tmp_path / "alexnet.npz"))
  run = convert(["--input=../alexnet.npz", "--output=converted"], elsewhere, str(site))
  assert run.returncode == 0, run.stderr
  config = checkpoints.load_config(str(elsewhere / "converted"))
  assert (config.model.lrn_scope, config.batch_size, config.num_classes) == ("tower", 128, 3)


@pytest.mark.slow
def test_import_writes_a_checkpoint_training_restores_and_export_reads_back(tmp_path):
  """A grouped paper net trained on 67x67 crops (quickstart's) out to PyTorch and back in."""
  params = paper_params(67, num_classes=10)
  source, workdir = str(tmp_path / "alexnet.npz"), str(tmp_path / "converted")
  readers.write_state_dict(layouts.to_torch_grouped(params), source)
  published.import_weights(source, workdir)
  config, state = restore_train_state(workdir)
  assert (config.model.variant, config.model.towers, config.num_classes) == ("paper", 2, 10)
  assert config.image_size == 67 and config.init_from == source  # the size the weights' fc6 fits
  assert int(state.step) == 0
  assert_trees_equal(jax.tree.map(np.asarray, state.params), params)
  out = str(tmp_path / "back.npz")
  assert published.export_weights(workdir, out) == "torch_grouped"
  assert_trees_equal(readers.read_state_dict(out), layouts.to_torch_grouped(params))
  with pytest.raises(UserInputError, match="already holds checkpoints"):
    published.import_weights(source, workdir)
  with pytest.raises(UserInputError, match="not --format=caffe"):
    published.import_weights(source, str(tmp_path / "other"), fmt="caffe")
  with pytest.raises(UserInputError, match="no checkpoint at step 5"):
    published.export_weights(workdir, out, step=5)


@pytest.mark.long  # real-size nets: 61M parameters, 224-pixel inputs
def test_torchvision_and_caffe_files_import_with_their_configs(tmp_path, torchvision_sd):
  source, workdir = str(tmp_path / "alexnet.safetensors"), str(tmp_path / "torchvision")
  readers.write_state_dict(torchvision_sd, source)
  published.import_weights(source, workdir)
  config, state = restore_train_state(workdir)
  assert (config.model.variant, config.num_classes, config.image_size) == ("torchvision", 10, 224)
  assert tuple(config.channel_mean) == (123.675, 116.28, 103.53)
  assert_trees_equal(jax.tree.map(np.asarray, state.params), layouts.read_pretrained(source)[0])
  out = str(tmp_path / "back.pth" if importlib.util.find_spec("torch") else tmp_path / "back.npz")
  # torchvision's std back out of conv1
  assert published.export_weights(workdir, out) == "torchvision"
  back = readers.read_state_dict(out)
  for k in torchvision_sd:
    np.testing.assert_allclose(back[k], torchvision_sd[k], rtol=1e-6, atol=1e-8)
  source, workdir = str(tmp_path / "bvlc_alexnet.npy"), str(tmp_path / "caffe")
  np.save(
    source, random_caffe(np.random.default_rng(9), side=6, num_classes=1000), allow_pickle=True
  )
  published.import_weights(source, workdir)
  config, state = restore_train_state(workdir)
  assert (config.model.lrn_scope, config.model.lrn_k, config.image_size) == ("all", 1.0, 227)
  # Caffe's, RGB
  assert tuple(config.channel_mean) == pytest.approx((122.68, 116.67, 104.01), abs=0.01)
  assert_trees_equal(
    jax.tree.map(np.asarray, state.params), layouts.from_caffe_npy(source, rgb=True)
  )


def test_nonfinite_weights_are_neither_imported_nor_exported(tmp_path):
  """NaN or Inf in a file to import, or in a checkpoint to export: one line naming the
  tensors, and nothing written."""
  params = paper_params(67, num_classes=3)
  params["fc8"]["bias"][1] = np.inf
  source, workdir = str(tmp_path / "alexnet.npz"), str(tmp_path / "converted")
  readers.write_state_dict(layouts.to_torch_grouped(params), source)
  with pytest.raises(UserInputError, match="NaN or Inf values in fc8.bias;"):
    published.import_weights(source, workdir)
  assert not os.path.exists(workdir)
  mgr = checkpoints.manager(workdir, 3)
  checkpoints.save(mgr, 2, {"step": np.int32(2), "params": params})
  mgr.wait_until_finished()
  mgr.close()
  out = str(tmp_path / "back.npz")
  with pytest.raises(
    UserInputError, match="refusing checkpoint .*/2: NaN or Inf values in fc8/bias"
  ):
    published.export_weights(workdir, out)
  assert not os.path.exists(out)
