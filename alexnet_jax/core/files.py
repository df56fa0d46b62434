"""Files written whole or not at all: a crash mid-write never leaves a truncated file under
the final name (a workdir that cannot resume, features that cannot be read)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """A temporary name beside `path` (same folder, same extension, which np.savez and torch
  look at) to write to; flushed to disk and renamed to `path` when the block ends, removed if
  it raises. The rename is atomic on POSIX file systems."""
  directory, name = os.path.split(os.path.abspath(path))
  root, ext = os.path.splitext(name)
  tmp = os.path.join(directory, f".{root}.tmp{os.getpid()}{ext}")
  try:
    yield tmp
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    f.write(text)
