"""Features files in a bucket (a real GCS server): rows staged on the local disk, the file
uploaded whole, a rerun resuming from the local rows, and the file read back with fc7 mapped."""

import os
import re
import shutil
import types

import numpy as np
import pytest

from alexnet_jax.analysis import featurefile
from alexnet_jax.core import files
from alexnet_jax.core.errors import UserInputError

ROWS = np.arange(40, dtype=np.float32).reshape(5, 8)
IDENTITY = {"net": "n", "images": "i"}


def append(writer, start: int, stop: int) -> None:
  writer.append(
    ROWS[start:stop],
    [[0, 1, 2]] * (stop - start),
    [[0.5, 0.3, 0.2]] * (stop - start),
    [f"{i}.jpg" for i in range(start, stop)],
    list(range(start, stop)),
  )


def test_a_features_file_in_a_bucket_is_uploaded_whole_and_read_back_mapped(gcs):
  bucket = gcs.bucket()
  path = f"{bucket}/features/f.npz"
  writer = featurefile.Writer(path, max_rows=5, dim=8, k=3)
  assert not featurefile.partial_dir(path).startswith("gs://")  # rows on the local disk
  append(writer, 0, 4)
  assert gcs.files(bucket) == []  # nothing in the bucket before the file is whole
  writer.close(classes=("x", "y", "z"), step=7)
  assert gcs.files(bucket) == [path]
  assert not os.path.exists(featurefile.partial_dir(path))
  f = featurefile.read(path)
  assert isinstance(f["fc7"], np.memmap)  # from a local download, never held in memory
  np.testing.assert_array_equal(f["fc7"], ROWS[:4])
  assert f["path"].tolist() == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]
  assert f["classes"].tolist() == ["x", "y", "z"] and int(f["step"]) == 7


def test_a_stopped_extraction_into_a_bucket_resumes_from_its_local_rows(gcs):
  path = f"{gcs.bucket()}/f.npz"
  writer = featurefile.Writer(path, 5, 8, 3, identity=IDENTITY)
  append(writer, 0, 2)
  writer.save_progress(2)
  append(writer, 2, 3)  # then killed: a row after the last record, which a rerun writes again
  del writer
  again = featurefile.Writer(path, 5, 8, 3, identity=IDENTITY)
  assert (again.count, again.images_done) == (2, 2)
  append(again, 2, 5)
  again.close(classes=(), step=1)
  f = featurefile.read(path)
  np.testing.assert_array_equal(f["fc7"], ROWS)
  assert f["label"].tolist() == [0, 1, 2, 3, 4]
  assert f["path"].tolist() == [f"{i}.jpg" for i in range(5)]


def test_partial_rows_of_two_bucket_files_of_one_name_are_kept_apart(gcs):
  a, b = f"{gcs.bucket()}/f.npz", f"{gcs.bucket()}/f.npz"
  assert featurefile.partial_dir(a) != featurefile.partial_dir(b)
  assert featurefile.partial_dir(a) == featurefile.partial_dir(a)  # a rerun finds its rows


def test_bucket_features_file_errors_name_the_bucket_file(gcs, tmp_path):
  bucket = gcs.bucket()
  with pytest.raises(UserInputError, match=f"features file {bucket}/missing.npz does not exist"):
    featurefile.read(f"{bucket}/missing.npz")
  np.savez(tmp_path / "other.npz", x=np.zeros(2))
  files.upload(str(tmp_path / "other.npz"), f"{bucket}/other.npz")
  with pytest.raises(UserInputError, match=f"^{bucket}/other.npz is not a features file"):
    featurefile.read(f"{bucket}/other.npz")


def test_too_little_local_space_to_stage_a_bucket_file_is_one_line(gcs, monkeypatch):
  path = f"{gcs.bucket()}/f.npz"
  monkeypatch.setattr(shutil, "disk_usage", lambda _: types.SimpleNamespace(free=10**6))
  with pytest.raises(UserInputError) as e:
    featurefile.Writer(path, max_rows=1000, dim=4096, k=5)
  assert re.fullmatch(
    rf"the features of 1000 images need 0\.\d\d GB free to stage {path} locally \(the file and "
    r"its rows while it is written\) but .* has 0\.00 GB free: free some space or point TMPDIR "
    r"at a larger local disk",
    str(e.value),
  )
  assert not os.path.exists(featurefile.partial_dir(path))
