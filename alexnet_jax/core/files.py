"""Files written whole or not at all: a crash mid-write never leaves a truncated file under
the final name (a workdir that cannot resume, features that cannot be read).

Storage may be shared between hosts (NFS, a bucket mounted as a folder), where two processes
in two containers can both be pid 1: a temporary name holds the host, the pid and random
bits, so concurrent writers of one file never write into each other's temporary file.

In a bucket (gs://) there is no rename: the file is written to a local temporary file and
uploaded in one request, and an object store makes an object visible only once its upload
is complete, so readers again see the old object or the new one, never a part."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import tempfile
from typing import Iterator

from alexnet_jax.core import storage
from alexnet_jax.core.errors import UserInputError


def temporary_name(path: str) -> str:
  """A hidden name beside `path`, unique across hosts and processes, with `path`'s extension
  (which np.savez, np.save and torch look at): .NAME.tmp-HOST-PID-RANDOM.EXT."""
  directory, name = os.path.split(os.path.abspath(path))
  root, ext = os.path.splitext(name)
  host = re.sub(r"[^A-Za-z0-9_-]+", "_", socket.gethostname())[:40]
  return os.path.join(directory, f".{root}.tmp-{host}-{os.getpid()}-{secrets.token_hex(4)}{ext}")


def _fsync_directory(directory: str) -> None:
  """Makes a rename in `directory` durable: without it a power cut can undo the rename.
  Some file systems cannot open or sync a folder; there the rename is as durable as they
  make it."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """A temporary name beside `path` (`temporary_name`) to write to; flushed to disk, renamed
  to `path` and the rename synced when the block ends, removed if it raises. The rename is
  atomic on POSIX file systems: readers see the old file or the new one, never a mix. For a
  remote `path`, the temporary file is local and is uploaded whole when the block ends."""
  if storage.is_remote(path):
    with _uploaded(path) as tmp:
      yield tmp
    return
  tmp = temporary_name(path)
  try:
    yield tmp
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_directory(os.path.dirname(os.path.abspath(path)))
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def _uploaded(path: str) -> Iterator[str]:
  with tempfile.TemporaryDirectory(prefix="alexnet_jax_upload_") as folder:
    tmp = os.path.join(folder, os.path.basename(os.fspath(path)))
    yield tmp
    upload(tmp, path)


def upload(local: str, remote: str) -> None:
  """Copies a local file to `remote` in one upload: an object appears whole or not at all (an
  upload cut short is never finalised)."""
  fs, name = storage.filesystem(remote)
  fs.put_file(local, name)


def download(remote: str, local: str) -> None:
  """Copies `remote` to the local path `local`, whole or not at all (`atomic_path`)."""
  fs, name = storage.filesystem(remote)
  with atomic_path(local) as tmp:
    fs.get_file(name, tmp)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
  """A local file holding `path`: itself, or for a file in a bucket a temporary copy of it
  (memory maps, torch and safetensors read local files only), removed when the block ends.

  Raises:
    FileNotFoundError: the bucket has no such file.
    UserInputError: the temporary folder ($TMPDIR) lacks the space for the copy.
  """
  if not storage.is_remote(path):
    yield path
    return
  fs, name = storage.filesystem(path)
  if not fs.isfile(name):
    raise FileNotFoundError(path)
  size, folder = fs.size(name), tempfile.gettempdir()
  free = shutil.disk_usage(folder).free
  if size > free:
    raise UserInputError(
      f"reading {path} needs {size / 1e9:.2f} GB free to download it but {folder} has "
      f"{free / 1e9:.2f} GB free: free some space or point TMPDIR at a larger local disk"
    )
  with tempfile.TemporaryDirectory(prefix="alexnet_jax_download_") as local:
    copy = os.path.join(local, os.path.basename(name))
    download(path, copy)
    yield copy


def write_text(path: str, text: str) -> None:
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    f.write(text)
