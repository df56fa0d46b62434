"""Where metrics go: DIR/metrics.jsonl (one JSON object per write), TensorBoard, the console.

Only process 0 writes, so a multi-process run logs each figure once. A line torn by a full
disk or a kill mid-write can only be the last: readers drop it (with a warning), and a
writer cuts it off before appending, so the next record starts on a line of its own.

In a bucket (gs://) nothing can be appended (gcsfs's "a" mode silently overwrites): the
writer keeps the file's text and uploads it whole at each write, so readers see the file
before or after a record, never a torn line. It stays small (a line per logged step: a few
MB for 90 ImageNet epochs logged every 100 steps). TensorBoard's event files are written by
TensorFlow's own GCS client, which is never used (`core.storage`): they are written to a
local temporary folder and each uploaded whole at every write.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from typing import Callable, NamedTuple

from absl import logging

from alexnet_jax.core import files, storage
from alexnet_jax.core.errors import UserInputError


def _plain(value):
  value = float(value)
  return value if math.isfinite(value) else str(value)


class MetricWriter:
  """Appends to metrics.jsonl and TensorBoard event files under workdir. Every record carries
  its step and epoch (steps / steps_per_epoch), so that reports need not open the dataset."""

  def __init__(self, workdir: str, steps_per_epoch: int, enabled: bool = True):
    self.enabled, self.steps_per_epoch = enabled, steps_per_epoch
    self.path = storage.join(workdir, "metrics.jsonl")
    self._tb = None
    self._text = None  # in a bucket: the file's text, rewritten whole at each write
    if enabled:
      _mend(self.path)
      if storage.is_remote(self.path):
        self._text = _text(self.path)
      self._tb = _TensorBoard(storage.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "epoch": round(step / self.steps_per_epoch, 6)}
    record |= {k: _plain(v) for k, v in metrics.items()}
    line = json.dumps(record) + "\n"
    if self._text is None:
      with open(self.path, "a") as f:
        f.write(line)
    else:
      self._text += line
      files.write_text(self.path, self._text)
    self._tb.write(int(step), metrics)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


class _TensorBoard:
  """TensorBoard event files in `folder`; for a bucket, written to a local temporary folder
  (TensorFlow would write through its own GCS client) and uploaded whole at each write."""

  def __init__(self, folder: str):
    import tensorflow as tf  # the data path has already imported it; the model path never does

    self._tf, self.folder = tf, folder
    remote = storage.is_remote(folder)
    self._local = tempfile.mkdtemp(prefix="alexnet_jax_tensorboard_") if remote else None
    self._writer = tf.summary.create_file_writer(self._local or folder)

  def write(self, step: int, metrics: dict) -> None:
    with self._writer.as_default(step=step):
      for k, v in metrics.items():
        self._tf.summary.scalar(k, float(v))
    self._writer.flush()
    self._upload()

  def close(self) -> None:
    self._writer.close()
    self._upload()
    if self._local is not None:
      shutil.rmtree(self._local, ignore_errors=True)

  def _upload(self) -> None:
    """Each local event file to the bucket, whole (its name is this writer's own)."""
    if self._local is None:
      return
    for name in os.listdir(self._local):
      files.upload(os.path.join(self._local, name), storage.join(self.folder, name))


class _Read(NamedTuple):
  records: list[dict]
  whole: bool  # the file ends with a complete line: records can be appended to it


def _read(path: str) -> _Read:
  """The records of a metrics file; a torn last line (a write cut short) dropped and logged, a
  bad line before it an error naming the file and line."""
  text = _text(path)
  lines = text.splitlines()
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except ValueError:
      if number < len(lines):
        raise UserInputError(
          f"{path} line {number} is not a JSON record: {line[:60]!r}; fix or delete that line"
        ) from None
      logging.warning("%s: dropped its last line, cut short mid-write: %r", path, line[:60])
      return _Read(records, False)
  return _Read(records, not text or text.endswith("\n"))


def _text(path: str) -> str:
  """The file's text ("" where there is none yet), undecodable bytes replaced."""
  try:
    return storage.path(path).read_bytes().decode(errors="replace")
  except FileNotFoundError:
    return ""


def _mend(path: str) -> None:
  """Cuts a torn last line off, so that the next record is appended on a line of its own."""
  read = _read(path)
  if not read.whole:
    _write(path, read.records)


def _write(path: str, records: list[dict]) -> None:
  files.write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def read_metrics(workdir: str) -> list[dict]:
  """Every record of workdir/metrics.jsonl, in order; a torn last line is left out."""
  return _read(storage.join(workdir, "metrics.jsonl")).records


def keep_records(workdir: str, keep: Callable[[dict], bool]) -> None:
  """Drops the records `keep` refuses (what a killed run logged after its last checkpoint), so
  that a resumed run's metrics.jsonl reads as if it had never been interrupted."""
  path = storage.join(workdir, "metrics.jsonl")
  read = _read(path)
  kept = [r for r in read.records if keep(r)]
  if len(kept) < len(read.records) or not read.whole:
    _write(path, kept)


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rest = divmod(seconds, 3600)
  return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
  """The console line: step, loss, error, rate, images/s and ETA."""

  def __init__(self, total_steps: int, start_step: int, enabled: bool = True):
    self.total, self.enabled = total_steps, enabled
    self._t, self._step, self._steps_per_sec = time.perf_counter(), start_step, 0.0

  def images_per_sec(self, step: int, batch_size: int) -> float:
    """Images per second since the last call (the rate of the steps just logged)."""
    now = time.perf_counter()
    self._steps_per_sec = (step - self._step) / max(now - self._t, 1e-9)
    self._t, self._step = now, step
    return self._steps_per_sec * batch_size

  def log(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    eta = (self.total - step) / max(self._steps_per_sec, 1e-9)
    logging.info(
      "step %d/%d | loss %.4f | top-1 err %.2f%% | lr %.2e | %.1f img/s | ETA %s",
      step,
      self.total,
      metrics["train/loss"],
      100 * metrics["train/top1_error"],
      metrics["learning_rate"],
      metrics["images_per_sec"],
      _duration(eta),
    )
