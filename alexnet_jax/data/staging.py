"""Data in a bucket, read from a local disk: a gs:// data dir is copied ("staged") to a local
folder once per host before training reads it.

Raw shards are memory-mapped, ArrayRecord (prepared shards, TFDS) reads local files only, and
tf.data file reads would go through TensorFlow's own GCS client (`core.storage`): none of
them can read a bucket. So only what a run reads is copied (`prepared`, `image_folder`; TFDS:
`tfds_source`), into STAGE_DIR/<scheme>/<bucket>/<path>:

- space first: the bytes still to copy against the local disk's free space, a one-line error
  naming --config.stage_dir where they do not fit, before any copy;
- resumable: a file is copied again only if it is missing locally, or its size or the
  object's checksum (md5, else crc32c, else generation) differs from the one recorded in the
  folder's manifest when it was copied; each file is copied under a temporary name and renamed
  when whole (`files.download`);
- one copier per host: the processes of a host take a lock on the folder (flock) in turn, so
  the second finds the first's copy complete; another host has its own disk and its own copy;
- logged: files, bytes and seconds.

`publish` is the other direction (prepare into a bucket): a local file uploaded whole and
recorded in the manifest as if staged, so the host that prepared has its copy already.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import json
import os
import shutil
import time
from typing import Iterable, Iterator, NamedTuple

from absl import logging

from alexnet_jax.core import files, storage
from alexnet_jax.core.errors import UserInputError
from alexnet_jax.data import shard_format
from alexnet_jax.data.stats import STATS_FILE

MANIFEST = ".alexnet_jax_staged.jsonl"  # one line per copied file: name, size, checksum
_LOCK = ".alexnet_jax_staging.lock"
_THREADS = 8  # concurrent downloads: one stream rarely fills a VM's network


def root(stage_dir: str = "") -> str:
  """Where staged copies go: stage_dir, else $XDG_CACHE_HOME (or ~/.cache)/alexnet_jax/staged."""
  if stage_dir:
    return os.path.abspath(os.path.expanduser(stage_dir))
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
  return os.path.join(cache, "alexnet_jax", "staged")


def local_dir(remote: str, stage_dir: str = "") -> str:
  """The local folder that mirrors `remote` (gs://bucket/a/b -> ROOT/gs/bucket/a/b)."""
  scheme, rest = os.fspath(remote).split("://", 1)
  parts = [p for p in rest.split("/") if p]
  if any(p in (".", "..") for p in parts):
    raise UserInputError(f"{remote}: a bucket path with '.' or '..' cannot be staged; name it")
  return os.path.join(root(stage_dir), scheme, *parts)


def free_bytes(folder: str) -> int:
  """Free space on the disk that holds `folder` (or its nearest existing parent)."""
  while not os.path.exists(folder):
    folder = os.path.dirname(folder)
  return shutil.disk_usage(folder).free


@contextlib.contextmanager
def host_lock(folder: str) -> Iterator[None]:
  """Holds `folder`'s staging lock: one process of this host copies (or generates) into it at
  a time; the lock goes with the process, however it ends."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, _LOCK), "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      logging.info("waiting for another process of this host staging %s", folder)
      fcntl.flock(f, fcntl.LOCK_EX)
    yield


class Staged(NamedTuple):
  local: str  # the local copy
  copied: int  # files copied this time
  kept: int  # files already there
  bytes: int  # bytes copied
  seconds: float


def _checksum(info: dict) -> str:
  return str(info.get("md5Hash") or info.get("crc32c") or info.get("generation") or "")


def _manifest(local: str) -> dict[str, dict]:
  """What was copied into `local`, by name; a line cut short by a crash is ignored."""
  entries = {}
  with contextlib.suppress(FileNotFoundError), open(os.path.join(local, MANIFEST)) as f:
    for line in f:
      with contextlib.suppress(ValueError, KeyError, TypeError):
        entry = json.loads(line)
        entries[entry["name"]] = entry
  return entries


def _record(local: str, name: str, info: dict) -> None:
  """Notes that `name` is a whole copy of the object `info` describes (after it is renamed)."""
  line = json.dumps({"name": name, "size": info["size"], "checksum": _checksum(info)})
  with open(os.path.join(local, MANIFEST), "a") as f:
    f.write(line + "\n")


def _is_current(local: str, name: str, info: dict, recorded: dict) -> bool:
  entry = recorded.get(name)
  path = os.path.join(local, name)
  return (
    entry is not None
    and entry["size"] == info["size"]
    and entry["checksum"] == _checksum(info)
    and os.path.isfile(path)
    and os.path.getsize(path) == info["size"]
  )


def listing(remote: str, names: Iterable[str] = (), trees: Iterable[str] = ()) -> dict[str, dict]:
  """The objects to stage, by name under `remote`: the files `names` and every file under the
  folders `trees`, with their sizes and checksums.

  Raises:
    UserInputError: one of `names` is not in the bucket.
  """
  fs, base = storage.filesystem(remote)
  base = base.rstrip("/")
  found = {}
  for tree in trees:
    for name, info in fs.find(f"{base}/{tree}", detail=True).items():
      found[name[len(base) + 1 :]] = info
  for name in names:
    try:
      found[name] = fs.info(f"{base}/{name}")
    except FileNotFoundError:
      raise UserInputError(
        f"{storage.join(remote, name)} is missing: the data in {remote} is incomplete; "
        "rerun the command that wrote it"
      ) from None
  return found


def stage(
  remote: str, names: Iterable[str] = (), trees: Iterable[str] = (), stage_dir: str = ""
) -> Staged:
  """Copies the files `names` and the folders `trees` of `remote` to its local folder
  (`local_dir`), skipping what is already there; files under `trees` that the bucket no
  longer has are removed, so the local tree lists what the bucket lists.

  Raises:
    UserInputError: the local disk lacks the space (nothing is copied), or a file is missing.
  """
  local = local_dir(remote, stage_dir)
  wanted = listing(remote, names, trees)
  start = time.time()
  with host_lock(local):
    recorded = _manifest(local)
    todo = {n: i for n, i in wanted.items() if not _is_current(local, n, i, recorded)}
    need, free = sum(i["size"] for i in todo.values()), free_bytes(local)
    if need > free:
      raise UserInputError(
        f"staging {remote} needs {need / 2**30:.2f} GiB in {local}, which has "
        f"{free / 2**30:.2f} GiB free: set --config.stage_dir to a folder on a bigger disk"
      )
    _remove_others(local, trees, set(wanted))
    with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
      copies = {
        pool.submit(_copy, storage.join(remote, name), os.path.join(local, name)): (name, info)
        for name, info in todo.items()
      }
      for done in concurrent.futures.as_completed(copies):
        done.result()
        _record(local, *copies[done])
  staged = Staged(local, len(todo), len(wanted) - len(todo), need, time.time() - start)
  logging.info(
    "staged %s to %s: %d files (%.2f GiB) copied in %.1f s, %d already there",
    remote,
    local,
    staged.copied,
    staged.bytes / 2**30,
    staged.seconds,
    staged.kept,
  )
  return staged


def _copy(url: str, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  files.download(url, path)


def _remove_others(local: str, trees: Iterable[str], keep: set[str]) -> None:
  """Deletes the files under local/tree that are not in `keep` (removed from the bucket since
  they were staged, or temporary files of a killed copy): a folder's reader lists them."""
  for tree in trees:
    for folder, _, names in os.walk(os.path.join(local, tree)):
      for name in names:
        path = os.path.join(folder, name)
        if os.path.relpath(path, local) not in keep:
          os.remove(path)


def publish(local: str, remote: str, name: str) -> None:
  """Uploads local/name to remote/name whole (`files.upload`) and records it as staged."""
  files.upload(os.path.join(local, name), storage.join(remote, name))
  fs, base = storage.filesystem(storage.join(remote, name))
  info = fs.info(base)
  with host_lock(local):
    _record(local, name, info)


def prepared(data_dir: str, stage_dir: str = "") -> str:
  """A prepared data dir where training can read it: a local one as it is; a bucket's info
  file, statistics and the shards of the format it was last written in, staged. A bucket
  without a finished info file is returned as it is, for the reader's own error."""
  if not storage.is_remote(data_dir):
    return data_dir
  info = shard_format.read_finished_info(data_dir)
  if info is None:
    return data_dir
  names = [shard_format.INFO_FILE]
  if storage.path(storage.join(data_dir, STATS_FILE)).exists():
    names.append(STATS_FILE)
  for split in shard_format.SPLITS:
    shards = info.splits[split]
    if info.format == "raw":
      names += [f"{split}/{f}" for f in shards.raw_files]
      names += [f"{split}/{shard_format.raw_labels_path(f)}" for f in shards.raw_files]
    else:
      names += [f"{split}/{f}" for f in shards.files]
  return stage(data_dir, names, stage_dir=stage_dir).local


def image_folder(data_dir: str, stage_dir: str = "") -> str:
  """An image folder where training can read it: a bucket's train/ and val/ trees staged. A
  bucket without them is returned as it is, for the reader's own error."""
  if not storage.is_remote(data_dir) or not storage.path(data_dir).joinpath("train").is_dir():
    return data_dir
  return stage(data_dir, trees=("train", "val"), stage_dir=stage_dir).local
