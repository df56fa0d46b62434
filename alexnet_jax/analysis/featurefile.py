"""The features file (.npz) that extraction writes and retrieval and the figures read.

Arrays, one row per image: `fc7` (n, 4096) float32, `top5_index` (n, 5) int32 and
`top5_prob` (n, 5) float32 (classes by falling probability), `path` (n,) str, `label`
(n,) int32 (-1 where unknown); and `classes` (names the indices refer to, empty when
unknown) and `step` (the checkpoint's). The file is an uncompressed npz, so `read`
memory-maps `fc7` from inside it: a database of ImageNet's size never has to fit in
memory, and writing never holds it either: rows go to memory-mapped files in the folder
PATH.partial first, with a progress record, so that a stopped extraction resumes from the
rows it finished (`Writer(..., identity=...)`).

Writing needs the file's size twice on its disk (the partial rows, then the file made from
them): `check_space` says so in one line before anything is written, and the partial files
are allocated whole when they are created, so that a disk that fills up later is an error,
never a bus error on a memory-mapped page.

In a bucket (gs://) there are no memory maps, appends or renames: the partial rows of
gs://.../F.npz are kept in a local folder named after it (`partial_dir`, under TMPDIR), where a
rerun on this host resumes from them, and the finished file is uploaded whole
(`files.atomic_path`). `read` downloads such a file to a local temporary file and maps `fc7`
from there.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import tempfile
import zipfile
from typing import Any, Sequence

import numpy as np

from alexnet_jax.core import files, storage
from alexnet_jax.core.errors import UserInputError

_ROW_DTYPES = {
  "fc7": np.float32,
  "top5_index": np.int32,
  "top5_prob": np.float32,
  "label": np.int32,
}
_PATHS, _PROGRESS = "paths.jsonl", "progress.json"
_SLACK = 1 << 20  # the npz's headers, `classes` and `step`: well under a MiB


def partial_dir(path: str) -> str:
  """Where the rows of the features file `path` are kept while it is written: PATH.partial, or
  for a file in a bucket a local folder named after it (memory maps need a local disk), the
  same for every run on this host, so that a rerun resumes from it.

  Why not chunks uploaded to the bucket, which a rerun on another host could resume from: the
  rows would go to the bucket twice (as chunks, then as the file) and need a merge step, for
  an extraction any host can repeat; a lost host costs its extraction's time, not its data."""
  if not storage.is_remote(path):
    return path + ".partial"
  digest = hashlib.sha256(path.encode()).hexdigest()[:16]
  name = f"{digest}-{os.path.basename(path)}.partial"
  return os.path.join(tempfile.gettempdir(), "alexnet_jax_features", name)


def bytes_needed(rows: int, dim: int, k: int, path_chars: int) -> int:
  """Disk space a features file of `rows` rows takes while it is written: its partial rows
  (numbers, and the paths one JSON line each) and then the file itself (paths as numpy
  strings, 4 bytes a character), both on the disk until the partial rows are removed."""
  numbers = 4 * dim + 8 * k + 4
  return rows * (numbers + path_chars + 3) + rows * (numbers + 4 * path_chars) + _SLACK


def _allocated(folder: str) -> int:
  """Bytes the files in folder take on disk (0 if it does not exist)."""
  if not os.path.isdir(folder):
    return 0
  return sum(os.stat(e.path).st_blocks * 512 for e in os.scandir(folder) if e.is_file())


def _existing(folder: str) -> str:
  while not os.path.isdir(folder):
    folder = os.path.dirname(folder)
  return folder


def check_space(path: str, rows: int, dim: int, k: int, path_chars: int) -> None:
  """Refuses, before anything is written, to write the features file `path` where its disk
  lacks the room (`bytes_needed`; what a partial extraction already holds counts as room).

  Raises:
    UserInputError: not enough free space, with how much is needed and free.
  """
  partial = partial_dir(path)
  folder = _existing(os.path.dirname(os.path.abspath(partial)))
  needed = bytes_needed(rows, dim, k, path_chars) - _allocated(partial)
  free = shutil.disk_usage(folder).free
  if needed > free:
    where, fix = (
      (f"to stage {path} locally", "point TMPDIR at a larger local disk")
      if storage.is_remote(path)
      else (f"beside {path}", "write the file elsewhere (--output)")
    )
    raise UserInputError(
      f"the features of {rows} images need {needed / 1e9:.2f} GB free {where} (the file "
      f"and its rows while it is written) but {folder} has {free / 1e9:.2f} GB free: free "
      f"some space or {fix}"
    )


class Writer:
  """Collects rows batch by batch into memory-mapped files (memory does not grow with them);
  `close` writes the .npz and removes them.

  With `identity` (what makes two extractions the same: the net, the images), progress is
  recorded by `save_progress`, and a Writer made again with the same identity and shape goes
  on from the rows recorded (`count`, `images_done`); any other partial rows are replaced.
  """

  def __init__(
    self,
    path: str,
    max_rows: int,
    dim: int,
    k: int,
    identity: dict[str, Any] | None = None,
    path_chars: int = 256,
  ):
    if not path.endswith(".npz"):
      raise UserInputError(f"features file {path} must end in .npz")
    self.path, self.partial = path, partial_dir(path)
    self._shapes = {
      "fc7": (max_rows, dim),
      "top5_index": (max_rows, k),
      "top5_prob": (max_rows, k),
      "label": (max_rows,),
    }
    self._identity = (
      None if identity is None else {"identity": identity, "shape": [max_rows, dim, k]}
    )
    check_space(path, max_rows, dim, k, path_chars)
    recorded = self._recorded()
    self.count, self.images_done = recorded.get("rows", 0), recorded.get("images", 0)
    if not recorded:
      self._create()
    self._arrays = {
      key: np.lib.format.open_memmap(self._file(f"{key}.npy"), mode="r+") for key in _ROW_DTYPES
    }
    self._paths = open(self._file(_PATHS), "rb+")
    self._paths_bytes = recorded.get("paths_bytes", 0)  # the end of the last whole append
    self._paths.truncate(self._paths_bytes)
    self._paths.seek(self._paths_bytes)

  def _file(self, name: str) -> str:
    return os.path.join(self.partial, name)

  def _recorded(self) -> dict[str, Any]:
    """The progress of a partial extraction with this identity and shape; {} if none."""
    if self._identity is None:
      return {}
    try:
      with open(self._file(_PROGRESS), encoding="utf-8") as f:
        progress = json.load(f)
    except (OSError, ValueError):
      return {}
    return progress if {k: progress.get(k) for k in self._identity} == self._identity else {}

  def _create(self) -> None:
    """Empty partial files, allocated whole (a full disk now, not a bus error later)."""
    shutil.rmtree(self.partial, ignore_errors=True)
    os.makedirs(self.partial)
    try:
      for key, dtype in _ROW_DTYPES.items():
        array = np.lib.format.open_memmap(
          self._file(f"{key}.npy"), mode="w+", dtype=dtype, shape=self._shapes[key]
        )
        del array
        with open(self._file(f"{key}.npy"), "rb+") as f:
          if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
      open(self._file(_PATHS), "wb").close()
    except OSError as e:
      shutil.rmtree(self.partial, ignore_errors=True)
      if e.errno == errno.ENOSPC:
        raise UserInputError(
          f"no space left for the rows of {self.path}: free some space or write the file "
          "elsewhere (--output)"
        ) from None
      raise

  def append(
    self,
    fc7: np.ndarray,
    top5_index: np.ndarray,
    top5_prob: np.ndarray,
    paths: Sequence[str],
    labels: np.ndarray,
  ) -> None:
    rows = slice(self.count, self.count + len(fc7))
    for key, value in (
      ("fc7", fc7),
      ("top5_index", top5_index),
      ("top5_prob", top5_prob),
      ("label", labels),
    ):
      self._arrays[key][rows] = value
    self._paths.writelines((json.dumps(str(p)) + "\n").encode() for p in paths)
    self._paths_bytes = self._paths.tell()
    self.count += len(fc7)

  def save_progress(self, images_done: int) -> None:
    """Records the rows written so far (the first `images_done` images of the extraction's
    list gave them): flushed to disk first, so a rerun never reads a row that is not there."""
    self.images_done = images_done
    if self._identity is None:
      return
    for array in self._arrays.values():
      array.flush()
    self._paths.flush()
    os.fsync(self._paths.fileno())
    progress = self._identity | {
      "rows": self.count,
      "images": images_done,
      "paths_bytes": self._paths_bytes,
    }
    files.write_text(self._file(_PROGRESS), json.dumps(progress))

  def suspend(self, images_done: int) -> None:
    """Records the progress and leaves the partial rows for a rerun (without an identity
    there is nothing to resume: they are removed)."""
    if self._identity is None:
      self.discard()
      return
    self.save_progress(images_done)
    self._release()

  def close(self, classes: Sequence[str] | None, step: int) -> None:
    """Writes the features file (whole or not at all) and removes the partial rows."""
    try:
      self._paths.seek(0)
      paths = [json.loads(line) for line in self._paths]
      with files.atomic_path(self.path) as tmp:
        np.savez(
          tmp,
          **{key: array[: self.count] for key, array in self._arrays.items()},
          path=np.asarray(paths, str).reshape(-1),
          classes=np.asarray(tuple(classes or ()), str),
          step=np.int64(step),
        )
    finally:
      self.discard()

  def _release(self) -> None:
    self._arrays = {}
    if not self._paths.closed:
      self._paths.close()

  def discard(self) -> None:
    """Removes the partial rows (also after a failed extraction)."""
    self._release()
    shutil.rmtree(self.partial, ignore_errors=True)


def read(path: str) -> dict[str, np.ndarray]:
  """Every array of a features file; `fc7` memory-mapped (read from disk as it is used)."""
  if storage.is_remote(path):
    return _read_downloaded(path)
  if not os.path.isfile(path):
    raise _missing(path)
  return _read(path, path)


def _missing(path: str) -> UserInputError:
  return UserInputError(
    f"features file {path} does not exist: write it with python -m alexnet_jax.extract"
  )


def _read_downloaded(path: str) -> dict[str, np.ndarray]:
  """A features file in a bucket, downloaded whole to a local temporary file first (a memory
  map needs a local file; `files.local_copy` checks the space), then read as a local one. The
  temporary name is removed at once: the data stays on the disk only while `fc7`'s mapping
  lives."""
  try:
    with files.local_copy(path) as copy:
      return _read(copy, path)
  except FileNotFoundError:
    raise _missing(path) from None


def _read(file: str, path: str) -> dict[str, np.ndarray]:
  """The arrays of the local file `file`; errors name `path`, where it came from."""
  with np.load(file) as data:
    if "fc7" not in data.files:
      raise UserInputError(
        f"{path} is not a features file (no 'fc7'): write it with python -m alexnet_jax.extract"
      )
    out = {k: data[k] for k in data.files if k != "fc7"}
  out["fc7"] = _memmap_member(file, "fc7.npy", path)
  return out


def _memmap_member(file: str, name: str, path: str) -> np.ndarray:
  """An uncompressed .npy inside the zip `file`, memory-mapped where it lies in the file."""
  with zipfile.ZipFile(file) as zf:
    info = zf.getinfo(name)
  if info.compress_type != zipfile.ZIP_STORED:
    raise UserInputError(
      f"{path} is compressed; features files are written uncompressed (numpy.savez)"
    )
  with open(file, "rb") as f:
    f.seek(info.header_offset)
    name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])  # the local file header
    f.seek(info.header_offset + 30 + name_len + extra_len)
    version = np.lib.format.read_magic(f)
    read_header = (
      np.lib.format.read_array_header_1_0
      if version == (1, 0)
      else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = read_header(f)
    offset = f.tell()
  if 0 in shape:
    return np.zeros(shape, dtype)
  return np.memmap(
    file, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"
  )
