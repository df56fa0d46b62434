"""metrics.jsonl survives a write cut short (a full disk, a kill): the torn last line is
dropped with a warning, the next record starts on a line of its own, and a damaged line
before the last is an error naming the file and line."""

import json
import logging

import pytest

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
