"""Files a run or a command writes are whole or absent: a crash mid-write (simulated by a
writer that leaves half a file and raises) keeps what was there before and leaves no stray
temporary file."""

import json
import os

import ml_collections
import numpy as np
import pytest

from alexnet_jax.analysis import featurefile
from alexnet_jax.training import checkpoints
from alexnet_jax.weights import readers
from configs import quickstart


def half_written(path, /, *args, **kwargs):
  """A writer's stand-in (np.savez, safetensors): half a zip file, then the disk fills up."""
  with open(path, "wb") as f:
    f.write(b"PK\x03\x04 half")
  raise OSError("No space left on device")


def test_a_failed_config_write_keeps_the_previous_config(tmp_path, monkeypatch):
  config = quickstart.get_config()
  checkpoints.save_config(str(tmp_path), config)

  def full_disk(self, **kwargs):
    raise OSError("No space left on device")

  monkeypatch.setattr(ml_collections.ConfigDict, "to_json_best_effort", full_disk)
  with pytest.raises(OSError):
    checkpoints.save_config(str(tmp_path), config)
  assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == config.batch_size
  assert os.listdir(tmp_path) == ["config.json"]


def test_a_failed_features_write_leaves_no_features_file(tmp_path, monkeypatch):
  path = str(tmp_path / "features.npz")
  writer = featurefile.Writer(path, max_rows=2, dim=3, k=5)
  writer.append(np.ones((2, 3)), np.zeros((2, 5)), np.zeros((2, 5)), ["a", "b"], np.zeros(2))
  monkeypatch.setattr(np, "savez", half_written)
  with pytest.raises(OSError):
    writer.close(classes=None, step=1)
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_a_failed_weights_export_leaves_no_weights_file(tmp_path, monkeypatch, suffix):
  import safetensors.numpy

  monkeypatch.setattr(np, "savez", half_written)
  monkeypatch.setattr(safetensors.numpy, "save_file", lambda t, path: half_written(path))
  with pytest.raises(OSError):
    readers.write_state_dict({"w": np.ones(3, np.float32)}, str(tmp_path / f"alexnet{suffix}"))
  assert os.listdir(tmp_path) == []
