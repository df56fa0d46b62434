"""Weight files read and written safely: state dict files round trip, unknown and broken files
are named, and nothing pickled in a file runs (Caffe's .npy, .npz, PyTorch's .pth)."""

import io
import os
import tracemalloc
import zipfile

import numpy as np
import pytest
from conftest import TORCHVISION_SHAPES, Exploit, assert_trees_equal, need_torch, normal

from alexnet_jax.core import files
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


# Files that declare more than they hold: refused at the cost of their headers.

MB = 1 << 20


class Peak:
  """The most memory Python and numpy held at once inside `with Peak() as peak:` (tracemalloc
  follows numpy's array data too), in bytes."""

  def __enter__(self):
    tracemalloc.start()
    self.bytes = 0
    return self

  def __exit__(self, *exc):
    self.bytes = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()


class Rebuilt:
  """Pickles as numpy's rebuild of an array from `state` (version, shape, dtype, fortran,
  data): whatever a crafted file declares."""

  def __init__(self, state):
    self.state = state

  def __reduce__(self):
    return np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"), self.state


class Called:
  """Pickles as a call of numpy's own `fn(*args)`: a global the Caffe reader allows by name."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


def caffe_npy_of(path, pickled: bytes) -> str:
  """A .npy whose header says Caffe's 0-d object array and whose body is `pickled`."""
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(header, {"descr": "|O", "fortran_order": False, "shape": ()})
  with open(path, "wb") as f:
    f.write(header.getvalue() + pickled)
  return str(path)


SLOTS = 1 << 24  # 128 MB of object pointers, 64 MB of float32, a 128 MB pickle memo


@pytest.mark.parametrize(
  "name, body",
  [
    ("object_array", lambda: [Rebuilt((1, (SLOTS,), np.dtype(object), False, []))]),
    ("ndarray_call", lambda: [Called(np.ndarray, (SLOTS,), np.dtype("f4"))]),
    ("memo_index", None),  # a 10-byte pickle that names memo slot 2**24
  ],
)
def test_a_small_caffe_npy_cannot_make_us_allocate(tmp_path, name, body):
  path = str(tmp_path / f"{name}.npy")
  if body is None:
    caffe_npy_of(path, b"\x80\x02Nr" + SLOTS.to_bytes(4, "little") + b".")
  else:
    np.save(path, {"conv1": body()}, allow_pickle=True)
  assert os.path.getsize(path) < 400
  with Peak() as peak, pytest.raises(UserInputError) as e:
    readers.read_caffe_npy(path)
  assert peak.bytes < 8 * MB, f"{peak.bytes / MB:.0f} MB allocated for {path}: {e.value}"
  assert "\n" not in str(e.value)


def test_a_caffe_npy_is_read_as_views_of_its_own_bytes(tmp_path):
  """Arrays of Python 2's pickles (their data a str, read as latin1), in Fortran order; one
  whose data is shorter than its shape and one of integers are refused."""
  w = np.arange(6, dtype=np.float32).reshape(2, 3)
  data = np.asfortranarray(w).tobytes(order="F").decode("latin1")
  path = str(tmp_path / "py2.npy")
  np.save(path, {"fc8": [Rebuilt((1, (2, 3), np.dtype("f4"), True, data))]}, allow_pickle=True)
  np.testing.assert_array_equal(readers.read_caffe_npy(path)["fc8"][0], w)
  np.save(path, {"fc8": [Rebuilt((1, (SLOTS,), np.dtype("f4"), False, b"\0" * 16))]}, True)
  with pytest.raises(UserInputError, match=r"declares a \(16777216,\) float32 array .* holds 16"):
    readers.read_caffe_npy(path)
  np.save(path, {"fc8": [Rebuilt((1, (2,), np.dtype("i8"), False, b"\0" * 16))]}, True)
  with pytest.raises(UserInputError, match=r"its pickle calls numpy.dtype\('i8'\)"):
    readers.read_caffe_npy(path)


def zeros_member(archive: zipfile.ZipFile, key: str, shape) -> None:
  """A float32 .npy of zeros written into the archive in chunks: GBs declared, KBs stored."""
  with archive.open(f"{key}.npy", "w", force_zip64=True) as f:
    np.lib.format.write_array_header_1_0(
      f, {"descr": "<f4", "fortran_order": False, "shape": tuple(shape)}
    )
    left, chunk = 4 * int(np.prod(shape)), bytes(4 * MB)
    while left:
      f.write(chunk[: min(left, len(chunk))])
      left -= min(left, len(chunk))


def test_an_npz_is_checked_against_the_layout_before_any_member_is_inflated(tmp_path):
  """A 200 KB torchvision .npz whose classifier.4.weight declares 128 MB of zeros."""
  path = str(tmp_path / "alexnet.npz")
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
    for key, shape in TORCHVISION_SHAPES.items():
      zeros_member(archive, key, (8192, 4096) if key == "classifier.4.weight" else shape[:1])
  assert os.path.getsize(path) < 1 * MB
  with Peak() as peak, pytest.raises(UserInputError) as e:
    layouts.read_pretrained(path)
  assert peak.bytes < 8 * MB, f"{peak.bytes / MB:.0f} MB allocated before: {e.value}"
  assert r"classifier.4.weight (8192, 4096) (expected (4096, 4096))" in str(e.value)


def test_an_npz_member_declaring_more_than_the_zip_holds_is_refused_unallocated(tmp_path):
  path = str(tmp_path / "damaged.npz")
  with zipfile.ZipFile(path, "w") as archive:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
      header, {"descr": "<f4", "fortran_order": False, "shape": (SLOTS,)}
    )
    archive.writestr("features.0.weight.npy", header.getvalue() + b"\0" * 16)
  with Peak() as peak, pytest.raises(UserInputError, match="is damaged: features.0.weight.npy"):
    readers.read_state_dict(path)
  assert peak.bytes < 8 * MB


@pytest.mark.parametrize("kind", ["float_npy", "object_npy", "text"])
def test_an_npz_that_is_no_zip_is_named_without_inviting_pickle(tmp_path, kind):
  """numpy's own messages for these suggest allow_pickle=True: loading code from the file."""
  path = str(tmp_path / "alexnet.npz")
  if kind == "text":
    open(path, "w").write("not weights\n")
  else:
    value = np.zeros(3) if kind == "float_npy" else np.array([{"a": 1}], dtype=object)
    with open(path, "wb") as f:
      np.save(f, value, allow_pickle=True)
  with pytest.raises(UserInputError) as e:
    layouts.read_pretrained(path)
  message = str(e.value)
  assert "not a zip archive" in message and "pickle" not in message and "\n" not in message


def test_safetensors_headers_are_checked_before_any_tensor_is_loaded(tmp_path, monkeypatch):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  path = str(tmp_path / "alexnet.safetensors")
  shapes = dict(TORCHVISION_SHAPES) | {"classifier.1.weight": (4096, 4)}
  safetensors_numpy.save_file({k: np.zeros(s[:2], np.float32) for k, s in shapes.items()}, path)
  load_file = safetensors_numpy.load_file

  def loaded_first(*_):
    pytest.fail("loaded before the layout was checked")

  monkeypatch.setattr(safetensors_numpy, "load_file", loaded_first)
  with pytest.raises(UserInputError, match=r"classifier.1.weight \(4096, 4\) \(expected"):
    layouts.read_pretrained(path)
  monkeypatch.setattr(safetensors_numpy, "load_file", load_file)
  declared = {}
  readers.read_state_dict(path, declared.update)  # what the check is shown: the header's
  assert declared["classifier.1.weight"] == readers.Declared((4096, 4), "float32")


def test_pth_shapes_are_checked_before_any_tensor_is_copied(tmp_path, monkeypatch):
  """torch.load maps the file (mmap=True): the tensors' data is not read until the layout
  check passes. torch itself refuses a storage larger than its record in the file."""
  torch = need_torch()
  path = str(tmp_path / "alexnet.pth")
  shapes = dict(TORCHVISION_SHAPES) | {"classifier.1.weight": (4096, 4)}
  torch.save({k: torch.zeros(s[:2]) for k, s in shapes.items()}, path)

  def copied(*_):
    pytest.fail("copied before the layout was checked")

  monkeypatch.setattr(torch.Tensor, "numpy", copied)
  with pytest.raises(UserInputError, match=r"classifier.1.weight \(4096, 4\) \(expected"):
    layouts.read_pretrained(path)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_state_dicts_round_trip_through_a_bucket(gcs, suffix):
  """Small tensors: the full-size layout through a bucket is tests/system/test_gcs_outputs.py's
  (230 MB, 10 s through the local server)."""
  bucket = gcs.bucket()
  path = f"{bucket}/weights/alexnet{suffix}"
  rng = np.random.default_rng(0)
  tensors = {"features.0.weight": normal(rng, (4, 3, 2, 2), 1), "features.0.bias": np.ones(4)}
  readers.write_state_dict(tensors, path)
  assert gcs.files(bucket) == [path]  # one whole object, no temporary one left
  assert_trees_equal(readers.read_state_dict(path), tensors)


def damaged_npz(path: str) -> str:
  """An .npz whose one member declares 64 MB of float32 and holds 16 bytes."""
  with zipfile.ZipFile(path, "w") as archive:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
      header, {"descr": "<f4", "fortran_order": False, "shape": (SLOTS,)}
    )
    archive.writestr("features.0.weight.npy", header.getvalue() + b"\0" * 16)
  return path


def caffe_exploit(path: str, marker) -> str:
  np.save(path, {"conv1": [Exploit(marker), np.zeros(96, np.float32)]}, allow_pickle=True)
  return path


@pytest.mark.parametrize(
  "name, make, read",
  [
    ("damaged.npz", lambda path, _: damaged_npz(path), readers.read_state_dict),
    ("bvlc_alexnet.npy", caffe_exploit, readers.read_caffe_npy),
  ],
)
def test_a_bad_weights_file_in_a_bucket_is_refused_with_the_local_error(
  gcs, tmp_path, name, make, read
):
  """The file is downloaded and checked as a local one: the same one-line error, naming the
  bucket's file, nothing run and nothing allocated for what it declares."""
  local, remote = make(str(tmp_path / name), tmp_path / "pwned"), f"{gcs.bucket()}/{name}"
  files.upload(local, remote)
  with pytest.raises(UserInputError) as local_error:
    read(local)
  with Peak() as peak, pytest.raises(UserInputError) as remote_error:
    read(remote)
  assert str(remote_error.value) == str(local_error.value).replace(local, remote)
  assert remote in str(remote_error.value) and "\n" not in str(remote_error.value)
  assert peak.bytes < 8 * MB and not (tmp_path / "pwned").exists()


def test_a_missing_weights_file_in_a_bucket_is_named(gcs):
  path = f"{gcs.bucket()}/alexnet.pth"
  with pytest.raises(UserInputError, match=f"^weights file {path} does not exist$"):
    layouts.read_pretrained(path)
