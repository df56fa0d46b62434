"""The features file (.npz) that extraction writes and retrieval and the figures read.

Arrays, one row per image: `fc7` (n, 4096) float32, `top5_index` (n, 5) int32 and
`top5_prob` (n, 5) float32 (classes by falling probability), `path` (n,) str, `label`
(n,) int32 (-1 where unknown); and `classes` (names the indices refer to, empty when
unknown) and `step` (the checkpoint's). The file is an uncompressed npz, so `read`
memory-maps `fc7` from inside it: a database of ImageNet's size never has to fit in
memory, and writing never holds it either (rows go to a memory-mapped file first).
"""

from __future__ import annotations

import os
import struct
import zipfile
from typing import Sequence

import numpy as np

from alexnet_jax.core import files
from alexnet_jax.core.errors import UserInputError

_ROW_DTYPES = {"top5_index": np.int32, "top5_prob": np.float32, "path": np.str_, "label": np.int32}


class Writer:
  """Collects rows batch by batch; `close` writes the .npz. The fc7 rows go to a memory-mapped
  file as they come (memory does not grow with them); only the small fields stay in memory."""

  def __init__(self, path: str, max_rows: int, dim: int, k: int):
    if not path.endswith(".npz"):
      raise UserInputError(f"features file {path} must end in .npz")
    self.path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._rows_path = path + ".fc7.partial.npy"
    self._fc7 = np.lib.format.open_memmap(
      self._rows_path, mode="w+", dtype=np.float32, shape=(max_rows, dim)
    )
    self._small = {
      key: [np.zeros((0, k) if key.startswith("top5") else (0,), dtype)]  # typed, for 0 rows
      for key, dtype in _ROW_DTYPES.items()
    }
    self.count = 0

  def append(
    self,
    fc7: np.ndarray,
    top5_index: np.ndarray,
    top5_prob: np.ndarray,
    paths: Sequence[str],
    labels: np.ndarray,
  ) -> None:
    self._fc7[self.count : self.count + len(fc7)] = fc7
    self.count += len(fc7)
    for key, value in (
      ("top5_index", top5_index),
      ("top5_prob", top5_prob),
      ("path", paths),
      ("label", labels),
    ):
      self._small[key].append(np.asarray(value, _ROW_DTYPES[key]))

  def close(self, classes: Sequence[str] | None, step: int) -> None:
    try:
      with files.atomic_path(self.path) as tmp:
        np.savez(
          tmp,
          fc7=self._fc7[: self.count],
          **{k: np.concatenate(v) for k, v in self._small.items()},
          classes=np.asarray(tuple(classes or ()), str),
          step=np.int64(step),
        )
    finally:
      self.discard()

  def discard(self) -> None:
    """Removes the rows file (also after a failed extraction)."""
    self._fc7 = None
    if os.path.exists(self._rows_path):
      os.remove(self._rows_path)


def read(path: str) -> dict[str, np.ndarray]:
  """Every array of a features file; `fc7` memory-mapped (read from disk as it is used)."""
  if not os.path.isfile(path):
    raise UserInputError(
      f"features file {path} does not exist: write it with python -m alexnet_jax.extract"
    )
  with np.load(path) as data:
    if "fc7" not in data.files:
      raise UserInputError(
        f"{path} is not a features file (no 'fc7'): write it with python -m alexnet_jax.extract"
      )
    out = {k: data[k] for k in data.files if k != "fc7"}
  out["fc7"] = _memmap_member(path, "fc7.npy")
  return out


def _memmap_member(path: str, name: str) -> np.ndarray:
  """An uncompressed .npy inside a zip, memory-mapped where it lies in the file."""
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo(name)
  if info.compress_type != zipfile.ZIP_STORED:
    raise UserInputError(
      f"{path} is compressed; features files are written uncompressed (numpy.savez)"
    )
  with open(path, "rb") as f:
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
    path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"
  )
