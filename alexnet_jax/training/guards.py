"""What keeps a workdir whole around a job: one owner at a time, and a full disk said in one
line, with the checkpoints finished before it kept."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import tempfile
from typing import Callable, Iterator

import jax
import ml_collections
import numpy as np

from alexnet_jax.core import locks, storage
from alexnet_jax.core.errors import UserInputError

NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device", as orbax quotes it too


def owning_workdir(job: Callable) -> Callable:
  """Runs `job(config, workdir, ...)` owning workdir (`core.locks`) before it touches anything
  there: a second run on it is refused. Process 0 takes the lock (the others share the workdir
  by design) and tells them whether it got it, so that none waits for a process 0 that left."""

  @functools.wraps(job)
  def run(config: ml_collections.ConfigDict, workdir: str, *args, **kwargs):
    lock, refusal = contextlib.nullcontext(), None
    if jax.process_index() == 0:
      try:
        lock = locks.take(workdir, "workdir", "wait for that run to end, or use another --workdir")
      except UserInputError as e:
        refusal = e
    got = refusal is None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      got = bool(multihost_utils.broadcast_one_to_all(np.int32(got)))
    if not got:
      raise refusal or UserInputError(f"process 0 could not own workdir {workdir}: see its error")
    with lock:
      return job(config, workdir, *args, **kwargs)

  return run


@contextlib.contextmanager
def full_disk_is_an_error(workdir: str) -> Iterator[None]:
  """A write that fails for lack of space (an OSError, or orbax's error quoting it) as one line.
  The checkpoints finished before stay good: orbax renames a checkpoint into place only once
  it is whole, and a resume drops a metrics line torn by the full disk.

  A bucket is never full: there only the local disk of the temporary files that are uploaded
  whole (metrics, TensorBoard events, configs) can be, and the line names that one."""
  try:
    yield
  except Exception as e:
    if getattr(e, "errno", None) != errno.ENOSPC and NO_SPACE not in str(e):
      raise
    disk = f"the disk holding {workdir}"
    if storage.is_remote(workdir):
      disk = f"the local disk of temporary files ({tempfile.gettempdir()}, TMPDIR)"
    raise UserInputError(
      f"{disk} is full ({NO_SPACE}); the last finished checkpoint is kept: "
      "free some space there and rerun the same command"
    ) from None
