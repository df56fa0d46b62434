"""Weight files read and written safely, whatever layout they hold: nothing in a file runs,
and no file makes us allocate more than the tensors it should hold.

- Caffe's .npy (caffe-tensorflow's pickled {layer: [weights, biases]} dict, Python 2 or 3):
  a restricted unpickler that rebuilds float arrays and plain containers only, each a view of
  the bytes the file holds.
- State dicts: .pth/.pt through PyTorch with weights_only=True, .safetensors, and .npz
  without pickles. torch and safetensors are needed only for their own files. Each tensor's
  name, shape and dtype are read from the file's headers and shown to the caller's check
  (the layout's) before any tensor's data is read: a small file that declares huge tensors is
  refused at the cost of its headers.

A file in a bucket (gs://) is downloaded whole to a local temporary file first (`_local`) and
checked as a local one; messages name it by its gs:// path. Writes are whole-file uploads
(`files.atomic_path`).

Which layout the tensors are in, and its conversion to ours, is layouts.py's.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import math
import mmap
import os
import pickle
import zipfile
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import numpy as np

from alexnet_jax.core import files, storage
from alexnet_jax.core.errors import UserInputError

STATE_DICT_SUFFIXES = (".pth", ".pt", ".safetensors", ".npz")
SUFFIXES = STATE_DICT_SUFFIXES + (".npy",)  # every weights file: state dicts and Caffe's .npy


class Declared(NamedTuple):
  """A tensor as its file's header declares it, before any of its data is read."""

  shape: tuple[int, ...]
  dtype: str  # numpy's or torch's name (float32, bfloat16), else the file's own (I64)


Check = Callable[[Mapping[str, Declared]], None]  # raises UserInputError to refuse a file

_NPY_HEADERS = {
  (1, 0): np.lib.format.read_array_header_1_0,
  (2, 0): np.lib.format.read_array_header_2_0,
}
_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
_SAFETENSORS_MAX_HEADER = 100 << 20  # the safetensors package's own limit


@contextlib.contextmanager
def _local(path: str) -> Iterator[str]:
  """A local file holding `path` (`files.local_copy`: the readers map files and torch and
  safetensors read local files only). The download costs the file's own size; no tensor it
  declares is allocated before the checks."""
  try:
    with files.local_copy(path) as local:
      yield local
  except FileNotFoundError:
    if not storage.is_remote(path):
      raise
    raise UserInputError(f"weights file {path} does not exist") from None


# Caffe's .npy: a pickle, rebuilt by an unpickler that cannot run code or allocate.


class _Refused(pickle.UnpicklingError):
  pass


class _NdarrayClass:
  """What the pickle gets for numpy.ndarray: a name to pass to `_reconstruct`, never a call
  (`ndarray(shape)` would allocate whatever shape the file asks for)."""


class _PendingArray:
  """An array as the pickle rebuilds it (`_reconstruct`, then BUILD with its state): the state
  is checked first, and the array is a view of the bytes the file holds, so no declared shape
  makes us allocate more than the file's own size."""

  def __init__(self, cls: Any, *_):
    if cls is not _NdarrayClass:
      raise _Refused(f"rebuilds a {cls!r}")
    self.value: Any = None

  def __setstate__(self, state: tuple) -> None:
    self.value = _array_from_state(state)


def _array_from_state(state: tuple) -> Any:
  """ndarray.__setstate__'s (version, shape, dtype, fortran, data) checked and viewed: a float
  array, or the one object that a 0-d object array (np.save's of the dict) holds."""
  try:
    shape, dtype, fortran, data = state[1:] if len(state) == 5 else state
  except (TypeError, ValueError):
    raise _Refused("holds a malformed array") from None
  if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
    raise _Refused(f"declares an array of shape {shape!r}")
  if not isinstance(dtype, np.dtype):
    raise _Refused(f"declares an array of dtype {dtype!r}")
  if dtype.hasobject:
    if shape != () or not isinstance(data, list) or len(data) != 1:
      raise _Refused(f"declares an object array of shape {shape}")
    return data[0]
  if dtype.kind != "f" or dtype.fields is not None or dtype.shape != ():
    raise _Refused(f"declares a {dtype} array")
  if isinstance(data, str):  # Python 2's str, read as latin1
    data = data.encode("latin1")
  nbytes = math.prod(shape) * dtype.itemsize
  if not isinstance(data, bytes) or len(data) != nbytes:
    size = len(data) if isinstance(data, (bytes, str)) else type(data).__name__
    raise _Refused(f"declares a {shape} {dtype} array ({nbytes} bytes) but holds {size}")
  return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")


def _dtype(name: Any, *_flags: Any) -> np.dtype:
  if name not in ("f2", "f4", "f8", "O4", "O8"):  # plain floats and the outer object array
    raise _Refused(f"calls numpy.dtype({name!r})")
  return np.dtype(name)


def _latin1(text: Any, encoding: Any) -> bytes:
  if not isinstance(text, str) or encoding != "latin1":
    raise _Refused(f"calls _codecs.encode(..., {encoding!r})")
  return codecs.encode(text, "latin1")  # how Python 3 pickles bytes at protocol 2


_NUMPY_GLOBALS = {
  ("numpy.core.multiarray", "_reconstruct"): _PendingArray,
  ("numpy._core.multiarray", "_reconstruct"): _PendingArray,
  ("numpy", "ndarray"): _NdarrayClass,
  ("numpy", "dtype"): _dtype,
  ("_codecs", "encode"): _latin1,
}


class _ArraysOnly(pickle._Unpickler):
  """Rebuilds float arrays and plain containers; refuses every other global, so nothing in
  the file can run. Python's own unpickler, not the C one: the C one sizes its memo by the
  largest index a file names (a 10-byte pickle can take gigabytes)."""

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in _NUMPY_GLOBALS:
      raise _Refused(f"calls {module}.{name}")
    return _NUMPY_GLOBALS[module, name]


def _resolved(tree: Any) -> Any:
  """The unpickled containers with each pending array replaced by its value."""
  if isinstance(tree, _PendingArray):
    return _resolved(tree.value)
  if isinstance(tree, dict):
    return {k: _resolved(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_resolved(v) for v in tree]
  return tree


def read_caffe_npy(path: str) -> dict:
  """The {layer: [weights, biases]} dict of a caffe-tensorflow .npy (written by Python 2 or 3),
  its arrays float views of the file's bytes."""
  with _local(path) as file, open(file, "rb") as f:
    try:
      version = np.lib.format.read_magic(f)
      shape, _, dtype = _NPY_HEADERS[version](f)
    except (ValueError, KeyError) as e:
      raise UserInputError(f"{path} is not a .npy file numpy can read ({e})") from None
    if dtype != np.dtype(object) or shape != ():
      raise UserInputError(
        f"{path} holds a {dtype} array of shape {shape}, not Caffe's pickled "
        "{layer: [weights, biases]} dict"
      )
    # Mapped, not read: the pickle's reads can ask for no more than the file holds.
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
      mapped.seek(f.tell())
      try:
        layers = _resolved(_ArraysOnly(mapped, encoding="latin1").load())
      except _Refused as e:
        raise UserInputError(
          f"refusing {path}: its pickle {e}, and a Caffe AlexNet .npy holds only float arrays, "
          "lists and dicts; nothing was loaded"
        ) from None
      except Exception as e:  # truncated or corrupt
        raise UserInputError(f"cannot read {path}: {type(e).__name__}: {e}") from None
  if not isinstance(layers, dict):
    raise UserInputError(
      f"{path} holds a {type(layers).__name__}, not Caffe's {{layer: [weights, biases]}} dict"
    )
  return layers


# State dicts: headers first, shown to the caller's check, then the data.


def read_state_dict(path: str, check: Check | None = None) -> dict[str, np.ndarray]:
  """A .pth/.pt (torch, weights only), .safetensors or .npz state dict as numpy arrays.

  check: called with every tensor's declared shape and dtype before any tensor's data is read
  (the layout's check, `layouts.read_pretrained`'s); it raises to refuse the file. Without
  one, a file is read as whatever it declares."""
  readers = {
    ".pth": _read_torch,
    ".pt": _read_torch,
    ".safetensors": _read_safetensors,
    ".npz": _read_npz,
  }
  suffix = os.path.splitext(path)[1].lower()
  reader = readers.get(suffix)
  if reader is None:
    raise UserInputError(
      f"unknown weights format {suffix or path!r} of {path}; use a state dict "
      f"({', '.join(STATE_DICT_SUFFIXES)}) or Caffe's .npy"
    )
  with _local(path) as file:
    return reader(file, path, check or (lambda declared: None))


def _read_torch(file: str, path: str, check: Check) -> dict[str, np.ndarray]:
  """Mapped (zip files, torch.save's since 1.6), so the check runs before any data is read;
  torch itself refuses a storage larger than its record in the file. `file` is read, `path`
  named in messages (they differ for a file in a bucket: `_local`)."""
  torch = _need("torch", path)
  try:
    tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
  except Exception as e:  # torch's refusal of pickled code, or a corrupt file
    raise UserInputError(
      f"{path} is not a state dict PyTorch loads with weights_only=True: {str(e).splitlines()[0]}"
    ) from None
  if not isinstance(tensors, Mapping) or not all(
    isinstance(v, torch.Tensor) for v in tensors.values()
  ):
    raise UserInputError(f"{path} holds a {type(tensors).__name__}, not a state dict of tensors")
  check(
    {k: Declared(tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()}
  )
  # Copied off the map: the arrays outlive the file's mapping, and the file.
  return {k: v.detach().to(torch.float32, copy=True).numpy() for k, v in tensors.items()}


def _read_safetensors(file: str, path: str, check: Check) -> dict[str, np.ndarray]:
  check(_safetensors_header(file, path))
  load_file = _need("safetensors.numpy", path).load_file
  try:
    return dict(load_file(file))
  except Exception as e:  # safetensors' own error types
    raise UserInputError(f"cannot read {path} as safetensors: {str(e).splitlines()[0]}") from None


def _safetensors_header(file: str, path: str) -> dict[str, Declared]:
  """The tensors a .safetensors file declares: its first 8 bytes give the length of the JSON
  header that follows, {name: {dtype, shape, data_offsets}}."""
  with open(file, "rb") as f:
    length = int.from_bytes(f.read(8), "little")
    size = os.fstat(f.fileno()).st_size
    try:
      if length > min(size - 8, _SAFETENSORS_MAX_HEADER):
        raise ValueError(f"a {length}-byte header in a {size}-byte file")
      header = json.loads(f.read(length))
      return {
        name: Declared(
          tuple(int(n) for n in entry["shape"]),
          _SAFETENSORS_DTYPES.get(entry["dtype"], str(entry["dtype"])),
        )
        for name, entry in header.items()
        if name != "__metadata__"
      }
    except (ValueError, TypeError, KeyError, AttributeError) as e:
      raise UserInputError(f"cannot read {path} as safetensors: {e}") from None


def _read_npz(file: str, path: str, check: Check) -> dict[str, np.ndarray]:
  """An .npz read member by member through the zip's own bounds: each member's .npy header is
  read, checked against its size in the zip's directory and shown to `check` before any
  member's data is inflated."""
  try:
    archive = zipfile.ZipFile(file)
  except (OSError, zipfile.BadZipFile) as e:
    raise UserInputError(
      f"cannot read {path} as .npz: not a zip archive ({e}); a state dict .npz is what "
      "numpy.savez writes, and Caffe's weights are a .npy"
    ) from None
  with archive:
    members = {_member_key(info, path): info for info in archive.infolist()}
    check({key: _npy_member_header(archive, info, path) for key, info in members.items()})
    return {key: _npy_member_data(archive, info, path) for key, info in members.items()}


def _member_key(info: zipfile.ZipInfo, path: str) -> str:
  if not info.filename.endswith(".npy"):
    raise UserInputError(f"{path} holds {info.filename}, not a .npy array: not a state dict .npz")
  return info.filename.removesuffix(".npy")


def _npy_member_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> Declared:
  """One member's shape and dtype, from its .npy header alone (a few hundred bytes inflated)."""
  with archive.open(info) as f:
    try:
      shape, _, dtype = _NPY_HEADERS[np.lib.format.read_magic(f)](f)
    except (ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
      raise UserInputError(f"cannot read {info.filename} of {path} as .npy ({e})") from None
    header = f.tell()
  if dtype.hasobject:
    raise UserInputError(
      f"refusing {path}: {info.filename} holds Python objects, and a state dict holds "
      "arrays only; nothing was loaded"
    )
  nbytes = math.prod(shape) * dtype.itemsize
  if info.file_size != header + nbytes:
    raise UserInputError(
      f"{path} is damaged: {info.filename} declares a {shape} {dtype} array ({nbytes} bytes) "
      f"but the zip gives it {info.file_size - header}"
    )
  return Declared(tuple(shape), dtype.name)


def _npy_member_data(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> np.ndarray:
  with archive.open(info) as f:
    try:
      return np.lib.format.read_array(f, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # truncated or corrupt
      raise UserInputError(f"cannot read {info.filename} of {path}: {e}") from None


def write_state_dict(tensors: Mapping[str, np.ndarray], path: str) -> None:
  """Writes under a temporary name first: an export killed mid-write leaves no bad file."""
  suffix = os.path.splitext(path)[1].lower()
  if suffix in (".pth", ".pt"):
    torch = _need("torch", path)
    with files.atomic_path(path) as tmp:
      torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, tmp)
  elif suffix == ".safetensors":
    save_file = _need("safetensors.numpy", path).save_file
    with files.atomic_path(path) as tmp:
      save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp)
  elif suffix == ".npz":
    with files.atomic_path(path) as tmp:
      np.savez(tmp, **tensors)
  else:
    raise UserInputError(
      f"unknown weights format {suffix or path!r} of {path}; use {', '.join(STATE_DICT_SUFFIXES)}"
    )


def _need(module: str, path: str) -> Any:
  try:
    return __import__(module, fromlist=["_"])
  except ImportError:
    raise UserInputError(
      f"{path} needs the {module.split('.')[0]} package: pip install "
      f"{module.split('.')[0]}, or use a .npz state dict"
    ) from None
