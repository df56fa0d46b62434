"""Paths in a bucket: whole-file writes, uploads and locks against a real GCS server."""

import os

import pytest
from conftest import hold_lock

from alexnet_jax.core import files, locks, storage
from alexnet_jax.core.errors import UserInputError


def test_remote_paths_keep_their_scheme():
  assert storage.is_remote("gs://b/run") and not storage.is_remote("/tmp/run")
  assert not storage.is_remote("file:///tmp/run")
  assert storage.join("gs://b/run", "ckpt", "1") == "gs://b/run/ckpt/1"
  assert storage.absolute("gs://b/run") == "gs://b/run"
  assert storage.absolute("run") == os.path.abspath("run")


def test_a_whole_file_write_reaches_the_bucket_only_when_complete(gcs):
  bucket = gcs.bucket()
  files.write_text(f"{bucket}/run/config.json", "{}")
  assert storage.path(f"{bucket}/run/config.json").read_text() == "{}"
  with pytest.raises(RuntimeError):
    with files.atomic_path(f"{bucket}/run/half.bin") as tmp:
      with open(tmp, "wb") as f:
        f.write(b"x" * 1000)
      raise RuntimeError("killed mid-write")
  assert gcs.files(bucket) == [f"{bucket}/run/config.json"]


def test_downloads_and_uploads_copy_whole_files(gcs, tmp_path):
  bucket = gcs.bucket()
  (tmp_path / "a.bin").write_bytes(os.urandom(3 << 20))
  files.upload(str(tmp_path / "a.bin"), f"{bucket}/x/a.bin")
  files.download(f"{bucket}/x/a.bin", str(tmp_path / "b.bin"))
  assert (tmp_path / "b.bin").read_bytes() == (tmp_path / "a.bin").read_bytes()


def test_a_bucket_folder_has_one_owner(gcs):
  folder = f"{gcs.bucket()}/run"
  other = hold_lock(folder)
  try:
    with pytest.raises(UserInputError, match=r"workdir gs://.*/run is in use by pid"):
      locks.take(folder, "workdir", "use another --workdir")
  finally:
    other.kill()
    other.wait()
  # The killed holder was a process of this host: its lock is stale and taken over.
  with locks.take(folder, "workdir", "use another --workdir"):
    assert storage.path(folder).joinpath(locks.LOCK_FILE).exists()
  assert not storage.path(folder).joinpath(locks.LOCK_FILE).exists()
