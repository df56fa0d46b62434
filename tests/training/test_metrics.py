"""metrics.jsonl survives a write cut short (a full disk, a kill): the torn last line is
dropped with a warning, the next record starts on a line of its own, and a damaged line
before the last is an error naming the file and line."""

import json
import logging
import os
import tempfile

import pytest

from alexnet_jax.core import files, storage
from alexnet_jax.core.errors import UserInputError
from alexnet_jax.training import metrics

RECORDS = [{"step": 1, "epoch": 0.2, "train/loss": 2.3}, {"step": 2, "epoch": 0.4, "val/loss": 2.2}]


def write(workdir, text: str) -> None:
  (workdir / "metrics.jsonl").write_text(text)


def lines(records) -> str:
  return "".join(json.dumps(r) + "\n" for r in records)


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, caplog):
  write(tmp_path, lines(RECORDS) + '{"step": 3, "epoch": 0.6, "train/lo')
  with caplog.at_level(logging.WARNING):
    assert metrics.read_metrics(str(tmp_path)) == RECORDS
  assert "dropped its last line, cut short mid-write" in caplog.text


def test_a_tail_of_zeros_is_a_torn_line(tmp_path):
  """What a crash can leave of a write the file system had only allocated."""
  write(tmp_path, lines(RECORDS) + "\0" * 30)
  assert metrics.read_metrics(str(tmp_path)) == RECORDS


def test_a_bad_line_before_the_last_is_an_error_naming_the_file_and_line(tmp_path):
  write(tmp_path, lines(RECORDS[:1]) + "{oops\n" + lines(RECORDS[1:]))
  with pytest.raises(UserInputError, match=r"metrics.jsonl line 2 is not a JSON record: '\{oops'"):
    metrics.read_metrics(str(tmp_path))


def test_a_writer_cuts_a_torn_line_off_before_appending(tmp_path):
  write(tmp_path, lines(RECORDS) + '{"step": 3, "ep')
  writer = metrics.MetricWriter(str(tmp_path), steps_per_epoch=5)
  writer.write(3, {"train/loss": 2.0})
  writer.close()
  assert metrics.read_metrics(str(tmp_path)) == RECORDS + [
    {"step": 3, "epoch": 0.6, "train/loss": 2.0}
  ]


def test_a_complete_last_record_without_its_newline_is_kept(tmp_path):
  write(tmp_path, lines(RECORDS).rstrip("\n"))
  assert metrics.read_metrics(str(tmp_path)) == RECORDS
  metrics.keep_records(str(tmp_path), lambda r: True)
  assert (tmp_path / "metrics.jsonl").read_text() == lines(RECORDS)


def test_in_a_bucket_each_write_uploads_the_whole_file(gcs):
  """A bucket has no append (gcsfs's "a" mode overwrites): every write rewrites the object
  with all its lines, after the torn one is cut off."""
  workdir = f"{gcs.bucket()}/run"
  path = f"{workdir}/metrics.jsonl"
  storage.path(path).write_text(lines(RECORDS) + '{"step": 3, "ep')
  writer = metrics.MetricWriter(workdir, steps_per_epoch=5)
  writer.write(3, {"train/loss": 2.0})
  assert metrics.read_metrics(workdir) == RECORDS + [{"step": 3, "epoch": 0.6, "train/loss": 2.0}]
  writer.write(4, {"train/loss": 1.5})
  writer.close()
  new = [{"step": 3, "epoch": 0.6, "train/loss": 2.0}, {"step": 4, "epoch": 0.8, "train/loss": 1.5}]
  assert storage.path(path).read_text() == lines(RECORDS + new)


def scalars(event_file: str) -> dict:
  """{(tag, step): value} of a TensorBoard event file."""
  import tensorflow as tf

  found = {}
  for event in tf.compat.v1.train.summary_iterator(event_file):
    for value in event.summary.value:
      found[(value.tag, event.step)] = float(tf.make_ndarray(value.tensor))
  return found


def test_in_a_bucket_tensorboard_events_are_uploaded_at_each_write(gcs, tmp_path, monkeypatch):
  """TensorFlow writes the events to a local temporary folder (its GCS client is never used);
  each write uploads them to WORKDIR/tensorboard/, where TensorBoard reads them; close
  removes the local folder."""
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  workdir = f"{gcs.bucket()}/run"
  writer = metrics.MetricWriter(workdir, steps_per_epoch=5)
  writer.write(1, {"train/loss": 2.5})
  (event_file,) = gcs.files(f"{workdir}/tensorboard")
  files.download(event_file, str(tmp_path / "first"))
  assert scalars(str(tmp_path / "first")) == {("train/loss", 1): 2.5}
  writer.write(2, {"train/loss": 2.0})
  writer.close()
  assert gcs.files(f"{workdir}/tensorboard") == [event_file]
  files.download(event_file, str(tmp_path / "last"))
  assert scalars(str(tmp_path / "last")) == {("train/loss", 1): 2.5, ("train/loss", 2): 2.0}
  assert sorted(os.listdir(tmp_path)) == ["first", "last"]  # the local folder is gone
