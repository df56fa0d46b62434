"""Where files live: a local folder or an object store (gs://, s3://), through one path type.

Every file the package reads or writes goes through `path()`: `etils.epath`, the path layer
orbax uses, so `--workdir=gs://bucket/run` reaches the same bucket for checkpoints (orbax,
through TensorStore) and for everything else (metrics, configs, statistics, features:
gcsfs). TensorFlow's own GCS client is never used: it reads no emulator (so it could not be
tested here) and a second client would be a second set of credentials and caches. Hence
EPATH_USE_TF=false, set before any remote path is opened.

Object stores have no rename, no append and no memory maps; the callers that need them say
what they do instead (`files.atomic_path`: one upload per file; `locks`: create-if-absent;
`metrics`: the file rewritten whole; `data.staging`: shards copied to a local disk).

With STORAGE_EMULATOR_HOST set (fake-gcs-server, the GCS emulator) TensorStore is pointed at
it too, and gcsfs skips its gRPC bucket-type probe, which an emulator does not answer.
"""

from __future__ import annotations

import os

os.environ.setdefault("EPATH_USE_TF", "false")
if os.environ.get("STORAGE_EMULATOR_HOST"):
  os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", os.environ["STORAGE_EMULATOR_HOST"])
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec  # noqa: E402
from etils import epath  # noqa: E402  (after the variables above, which it reads once)

Path = epath.Path
PathLike = str | os.PathLike
# gcsfs keeps listings and file sizes forever by default; several processes and hosts read
# what the others write (checkpoints, statistics, locks), so nothing is cached. Set before any
# gs:// file system is made: fsspec applies it when it makes one.
for _protocol in ("gs", "gcs"):
  fsspec.config.conf.setdefault(_protocol, {}).update(cache_timeout=0, use_listings_cache=False)


def is_remote(p: PathLike) -> bool:
  """Whether `p` names an object store (gs://, s3://, ...), not a local or mounted folder."""
  text = os.fspath(p)
  return "://" in text and not text.startswith("file://")


def path(p: PathLike) -> epath.Path:
  """`p` as a path object that reads and writes local folders and buckets alike."""
  return epath.Path(p)


def join(p: PathLike, *names: str) -> str:
  """`p`/names as a string that keeps a bucket's scheme (os.path.join would too, but
  os.path.abspath would turn gs://b into ./gs:/b)."""
  return os.fspath(path(p).joinpath(*names))


def absolute(p: PathLike) -> str:
  """A local path made absolute; a remote one as it is."""
  return os.fspath(p) if is_remote(p) else os.path.abspath(p)


def filesystem(p: PathLike):
  """The fsspec file system of a remote `p` and the name it has there, for what paths cannot
  do: uploads and downloads of whole files, create-if-absent."""
  return fsspec.core.url_to_fs(os.fspath(p))
