"""Data in a bucket copied to a local disk: only what is read, once, resumably, space first,
one copier per host; against a real GCS server (the `gcs` fixture)."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

from alexnet_jax.core import files, storage
from alexnet_jax.core.errors import UserInputError
from alexnet_jax.data import shard_format, staging


def fill(bucket: str, sizes: dict[str, int]) -> None:
  """Objects of the given names and sizes, distinct bytes each."""
  fs, name = storage.filesystem(bucket)
  for path, size in sizes.items():
    fs.pipe_file(f"{name}/{path}", os.urandom(size))


def local_files(folder: str) -> dict[str, bytes]:
  """Every file under `folder` (not the manifest and lock), by relative name."""
  found = {}
  for root, _, names in os.walk(folder):
    for name in names:
      if not name.startswith(".alexnet_jax_"):
        path = os.path.join(root, name)
        found[os.path.relpath(path, folder)] = open(path, "rb").read()
  return found


def remote_bytes(bucket: str, names) -> dict[str, bytes]:
  return {n: storage.path(f"{bucket}/{n}").read_bytes() for n in names}


@pytest.fixture
def data(gcs):
  """A bucket data dir: two wanted files, a tree, and a file no run reads."""
  bucket = gcs.bucket()
  fill(bucket, {"d/a.bin": 1000, "d/b.bin": 2000, "d/t/x.bin": 10, "d/t/y/z.bin": 20})
  fill(bucket, {"d/unread.bin": 5000})
  return f"{bucket}/d"


def test_the_local_folder_mirrors_the_bucket_path(tmp_path, monkeypatch):
  assert staging.local_dir("gs://b/x/y", str(tmp_path)) == str(tmp_path / "gs" / "b" / "x" / "y")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  assert staging.local_dir("gs://b/x") == str(tmp_path / "cache/alexnet_jax/staged/gs/b/x")
  with pytest.raises(UserInputError, match=r"'\.' or '\.\.'"):
    staging.local_dir("gs://b/../etc", str(tmp_path))


def test_staging_copies_what_is_read_and_skips_what_is_there(data, tmp_path):
  wanted = ["a.bin", "b.bin", "t/x.bin", "t/y/z.bin"]
  first = staging.stage(data, ["a.bin", "b.bin"], ["t"], str(tmp_path))
  assert (first.copied, first.kept, first.bytes) == (4, 0, 3030)
  assert local_files(first.local) == remote_bytes(data, wanted)  # not unread.bin
  os.remove(os.path.join(first.local, "b.bin"))
  again = staging.stage(data, ["a.bin", "b.bin"], ["t"], str(tmp_path))
  assert (again.copied, again.kept, again.bytes) == (1, 3, 2000)  # only the deleted one
  assert local_files(again.local) == remote_bytes(data, wanted)


def test_an_object_replaced_in_the_bucket_is_copied_again(data, tmp_path):
  """Same size, other bytes: the checksum recorded when it was copied tells them apart."""
  staged = staging.stage(data, ["a.bin"], stage_dir=str(tmp_path))
  fill(data, {"a.bin": 1000})
  assert staging.stage(data, ["a.bin"], stage_dir=str(tmp_path)).copied == 1
  assert local_files(staged.local) == remote_bytes(data, ["a.bin"])


def test_a_tree_loses_the_files_the_bucket_lost(data, tmp_path):
  """An image folder's reader lists its folders: a file deleted in the bucket must go."""
  local = staging.stage(data, trees=["t"], stage_dir=str(tmp_path)).local
  storage.path(f"{data}/t/x.bin").unlink()
  staging.stage(data, trees=["t"], stage_dir=str(tmp_path))
  assert sorted(local_files(local)) == ["t/y/z.bin"]


def test_too_little_space_is_refused_before_any_copy(data, tmp_path, monkeypatch):
  monkeypatch.setattr(staging, "free_bytes", lambda folder: 2999)
  with pytest.raises(UserInputError, match=r"needs 0.00 GiB .* set --config.stage_dir") as e:
    staging.stage(data, ["a.bin", "b.bin"], stage_dir=str(tmp_path))
  assert "\n" not in str(e.value)
  assert local_files(staging.local_dir(data, str(tmp_path))) == {}
  monkeypatch.setattr(staging, "free_bytes", lambda folder: 3000)  # exactly enough
  assert staging.stage(data, ["a.bin", "b.bin"], stage_dir=str(tmp_path)).copied == 2


def test_a_missing_file_is_a_one_line_error(data, tmp_path):
  with pytest.raises(UserInputError, match=r"gs://.*/d/gone.bin is missing"):
    staging.stage(data, ["a.bin", "gone.bin"], stage_dir=str(tmp_path))


# Both processes start staging at once (the test's "go" file), and each copy takes half a second:
# without the host lock both would copy everything.
STAGE = """
import os, sys, time
from alexnet_jax.data import shard_format, staging
copy = staging._copy
staging._copy = lambda *args: (time.sleep(0.5), copy(*args))
print("ready", flush=True)
while not os.path.exists(sys.argv[3]):
  time.sleep(0.01)
staged = staging.stage(sys.argv[1], ["big.bin", "a.bin"], ["t"], sys.argv[2])
print(staged.copied)
"""


def test_two_processes_staging_together_both_end_with_a_complete_copy(data, tmp_path):
  fill(data, {"big.bin": 8 << 20})
  go = tmp_path / "go"
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", STAGE, data, str(tmp_path / "stage"), str(go)],
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for _ in range(2)
  ]
  assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
  go.touch()
  outputs = [p.communicate(timeout=60) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
  # One copied the four files, the other waited for it and found them there.
  assert sorted(int(out) for out, _ in outputs) == [0, 4]
  local = staging.local_dir(data, str(tmp_path / "stage"))
  assert local_files(local) == remote_bytes(data, ["big.bin", "a.bin", "t/x.bin", "t/y/z.bin"])


def test_published_files_are_uploaded_whole_and_count_as_staged(gcs, tmp_path):
  bucket = f"{gcs.bucket()}/out"
  local = staging.local_dir(bucket, str(tmp_path))
  os.makedirs(os.path.join(local, "train"))
  files.write_text(os.path.join(local, "train", "s.bin"), "shard")
  staging.publish(local, bucket, "train/s.bin")
  assert storage.path(f"{bucket}/train/s.bin").read_text() == "shard"
  assert staging.stage(bucket, ["train/s.bin"], stage_dir=str(tmp_path)).copied == 0


def prepared_in(bucket: str, fmt: str) -> shard_format.Info:
  """A bucket data dir as `prepare` leaves it (the shards' bytes do not matter here)."""
  splits = {
    s: shard_format.SplitShards((f"{s}0.array_record",), 1, (f"{s}0.npy",), (1,))
    for s in shard_format.SPLITS
  }
  info = shard_format.Info("src", 256, ("a",), splits, fmt)
  shard_format.write_info(bucket, info)
  names = [f"{s}/{s}0{ext}" for s in shard_format.SPLITS for ext in (".array_record", ".npy")]
  fill(bucket, {n: 10 for n in names + ["train/train0.labels.npy", "val/val0.labels.npy"]})
  fill(bucket, {"stats.npz": 10, "skipped.txt": 10})
  return info


@pytest.mark.parametrize(
  "fmt, shards",
  [
    ("jpeg", ["train/train0.array_record", "val/val0.array_record"]),
    ("raw", ["train/train0.labels.npy", "train/train0.npy", "val/val0.labels.npy", "val/val0.npy"]),
  ],
)
def test_prepared_data_stages_its_info_statistics_and_the_shards_of_its_format(
  gcs, tmp_path, fmt, shards
):
  bucket = f"{gcs.bucket()}/prepared"
  prepared_in(bucket, fmt)
  local = staging.prepared(bucket, str(tmp_path))
  assert local == staging.local_dir(bucket, str(tmp_path))
  assert sorted(local_files(local)) == sorted(["dataset_info.json", "stats.npz", *shards])
  assert staging.prepared(str(tmp_path / "here"), str(tmp_path)) == str(tmp_path / "here")


def test_an_unfinished_or_missing_prepared_bucket_is_left_to_the_readers_error(gcs, tmp_path):
  bucket = gcs.bucket()
  assert staging.prepared(f"{bucket}/none", str(tmp_path)) == f"{bucket}/none"
  shard_format.write_info(bucket, shard_format.Info("src", 256, ("a",), {}))
  with pytest.raises(UserInputError, match="has not finished writing gs://"):
    staging.prepared(bucket, str(tmp_path))


def test_an_image_folder_stages_its_train_and_val_trees(gcs, tmp_path):
  bucket = gcs.bucket()
  fill(bucket, {"d/train/a/1.jpg": 5, "d/val/a/2.jpg": 6, "d/notes/x.txt": 7})
  local = staging.image_folder(f"{bucket}/d", str(tmp_path))
  assert sorted(local_files(local)) == ["train/a/1.jpg", "val/a/2.jpg"]
  assert staging.image_folder(f"{bucket}/none", str(tmp_path)) == f"{bucket}/none"
