"""Files a run or a command writes are whole or absent: a crash mid-write (simulated by a
writer that leaves half a file and raises) keeps what was there before and leaves no stray
temporary file."""

import builtins
import errno
import json
import os
import socket
import stat

import numpy as np
import pytest

from alexnet_jax.analysis import featurefile
from alexnet_jax.core import files
from alexnet_jax.training import checkpoints
from alexnet_jax.weights import readers
from configs import quickstart


def half_written(path, /, *args, **kwargs):
  """A writer's stand-in (np.savez, safetensors): half a zip file, then the disk fills up."""
  with open(path, "wb") as f:
    f.write(b"PK\x03\x04 half")
  raise OSError("No space left on device")


class FillingDisk:
  """A file opened for writing on a disk that fills up halfway through the first write."""

  def __init__(self, file):
    self._file = file

  def write(self, data):
    self._file.write(data[: len(data) // 2])
    self._file.flush()
    raise OSError(errno.ENOSPC, "No space left on device")

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._file.close()

  def __getattr__(self, name):
    return getattr(self._file, name)


def test_a_failed_config_write_keeps_the_previous_config(tmp_path, monkeypatch):
  """The disk fills up in the middle of the write, after the file was opened and truncated:
  a plain open(path, "w").write() leaves half a config.json behind."""
  config = quickstart.get_config()
  checkpoints.save_config(str(tmp_path), config)
  real_open = builtins.open

  def filling_disk(file, mode="r", *args, **kwargs):
    opened = real_open(file, mode, *args, **kwargs)
    return FillingDisk(opened) if "w" in mode else opened

  config.batch_size += 1
  with monkeypatch.context() as patch:
    patch.setattr(builtins, "open", filling_disk)
    with pytest.raises(OSError, match="No space left"):
      checkpoints.save_config(str(tmp_path), config)
  assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == config.batch_size - 1
  assert os.listdir(tmp_path) == ["config.json"]


def test_temporary_names_are_unique_across_hosts_with_the_same_pid(tmp_path, monkeypatch):
  """Two containers on shared storage are both pid 1: their temporary names still differ,
  and each names its host."""
  monkeypatch.setattr(os, "getpid", lambda: 1)
  path = str(tmp_path / "stats.npz")
  names = {}
  for host in ("host-a", "host-a", "host-b"):
    monkeypatch.setattr(socket, "gethostname", lambda host=host: host)
    with files.atomic_path(path) as tmp:
      names[tmp] = host
      with open(tmp, "w") as f:
        f.write(host)
  assert len(names) == 3 and os.listdir(tmp_path) == ["stats.npz"]
  assert all(host in os.path.basename(tmp) and tmp.endswith(".npz") for tmp, host in names.items())


def test_the_file_is_synced_before_its_rename_and_the_folder_after(tmp_path, monkeypatch):
  events = []
  real_fsync, real_replace = os.fsync, os.replace

  def fsync(fd):
    events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
    real_fsync(fd)

  def replace(src, dst):
    events.append("rename")
    real_replace(src, dst)

  monkeypatch.setattr(os, "fsync", fsync)
  monkeypatch.setattr(os, "replace", replace)
  files.write_text(str(tmp_path / "config.json"), "{}")
  assert events == ["fsync file", "rename", "fsync folder"]


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
