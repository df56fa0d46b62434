"""Weight files read and written safely: state dict files round trip, unknown and broken files
are named, and nothing pickled in a file runs (Caffe's .npy, .npz, PyTorch's .pth)."""

import os

import numpy as np
import pytest
from conftest import Exploit, assert_trees_equal, need_torch

from alexnet_jax.core.errors import UserInputError
from alexnet_jax.weights import layouts, readers


@pytest.mark.parametrize(
  "suffix", [".npz", ".safetensors", pytest.param(".pth", marks=pytest.mark.slow)]
)
def test_state_dict_files_round_trip(tmp_path, suffix, torchvision_sd):
  if suffix == ".pth":
    need_torch()
  sd = torchvision_sd
  path = str(tmp_path / f"alexnet{suffix}")
  readers.write_state_dict(sd, path)
  assert_trees_equal(readers.read_state_dict(path), sd)
  params, fmt = layouts.read_pretrained(path)  # adapted to our pipeline: std folded into conv1
  assert fmt == "torchvision"
  assert_trees_equal(params, layouts.from_torchvision(sd, layouts.TORCHVISION_STD))


def test_unknown_formats_are_named(tmp_path):
  path = str(tmp_path / "alexnet.bin")
  open(path, "wb").write(b"\0" * 8)
  with pytest.raises(UserInputError, match="unknown weights format '.bin'"):
    layouts.read_pretrained(path)
  with pytest.raises(UserInputError, match="unknown weights format '.bin'"):
    readers.write_state_dict({}, path)
  npz = str(tmp_path / "other.npz")
  np.savez(npz, **{"layer1.weight": np.zeros(3)})
  with pytest.raises(UserInputError, match="neither torchvision's AlexNet keys"):
    layouts.read_pretrained(npz)
  plain = str(tmp_path / "plain.npy")
  np.save(plain, np.zeros((2, 3)))
  with pytest.raises(UserInputError, match="not Caffe's pickled"):
    readers.read_caffe_npy(plain)
  with pytest.raises(UserInputError, match="is not a .npy file"):
    readers.read_caffe_npy(path)
  truncated = str(tmp_path / "truncated.npy")
  np.save(truncated, {"conv1": [np.zeros(4, np.float32)]}, allow_pickle=True)
  open(truncated, "r+b").truncate(os.path.getsize(truncated) - 20)
  with pytest.raises(UserInputError, match="cannot read .*truncated.npy"):
    readers.read_caffe_npy(truncated)
  corrupt = str(tmp_path / "corrupt.safetensors")
  open(corrupt, "wb").write(b"\x05" * 64)
  pytest.importorskip("safetensors")
  with pytest.raises(UserInputError, match="cannot read .* as safetensors"):
    readers.read_state_dict(corrupt)


def test_restricted_unpickler_refuses_code(tmp_path):
  marker = tmp_path / "pwned"
  path = str(tmp_path / "bvlc_alexnet.npy")
  np.save(path, {"conv1": [Exploit(marker), np.zeros(96, np.float32)]}, allow_pickle=True)
  with pytest.raises(
    UserInputError, match=r"refusing .*: its pickle calls (posix|os)\.system.*nothing was loaded"
  ):
    readers.read_caffe_npy(path)
  assert not marker.exists()
  # The same file in a .npz (pickled arrays) is refused too.
  np.savez(str(tmp_path / "w.npz"), a=np.array([Exploit(marker)], dtype=object))
  with pytest.raises(UserInputError, match="refusing"):
    readers.read_state_dict(str(tmp_path / "w.npz"))
  assert not marker.exists()


def test_torch_pth_is_read_with_weights_only(tmp_path):
  torch = need_torch()
  path = str(tmp_path / "evil.pth")
  torch.save({"features.0.weight": torch.zeros(1), "x": Exploit(tmp_path / "pwned")}, path)
  with pytest.raises(UserInputError, match="weights_only=True"):
    readers.read_state_dict(path)
  assert not (tmp_path / "pwned").exists()
