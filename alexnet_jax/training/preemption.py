"""SIGTERM/SIGINT become a request to checkpoint and stop, agreed on by every process.

One process alone stops at the next step. With several, the processes compare their
flags at the steps where they synchronise anyway (the metric logs), so all of them save
the same step; a cluster's preemption notice (SIGTERM to every process) is honoured
within `log_every_steps` steps.

An evaluation (ten patches of 50,000 images take longer than a cloud's grace period) asks
between its batches: one process stops at the next batch; several compare their flags every
`EVAL_CHECK_EVERY` batches, where all of them are (each runs the same batches, so the
comparison is one more collective in the same order everywhere: no process is left waiting
in an evaluation step the others gave up).
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
EVAL_CHECK_EVERY = 10  # batches between the processes' comparisons during an evaluation
_RECEIVED: list[str] = []  # every signal a Watcher caught in this process


def signals_received() -> int:
  """How many preemption signals Watchers caught in this process: a suite of runs stops when
  one came during a run."""
  return len(_RECEIVED)


class Stopped(Exception):
  """A stop request cut an evaluation short: its step is saved with the evaluation pending."""


class Watcher:
  """A context manager that catches the signals while training and restores the old handlers."""

  def __init__(self):
    self.signal_name: str | None = None
    self._old: dict = {}

  def _catch(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name
    _RECEIVED.append(self.signal_name)

  def __enter__(self) -> "Watcher":
    if threading.current_thread() is threading.main_thread():  # signals can only be caught there
      self._old = {s: signal.signal(s, self._catch) for s in _SIGNALS}
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._old.items():
      signal.signal(s, handler)

  def requested(self, step: int, every: int) -> bool:
    """Whether to checkpoint and stop after `step` (the same answer on every process)."""
    return self._asked(step, every)

  def stops_evaluation(self, batch: int) -> bool:
    """Whether to cut an evaluation short before its `batch` (0, 1, ...): the same answer on
    every process."""
    return self._asked(batch, EVAL_CHECK_EVERY)

  def _asked(self, count: int, every: int) -> bool:
    """One process: whether it caught a signal. Several: whether any did, compared when
    `count` is a multiple of `every` (False in between)."""
    if jax.process_count() == 1:
      return self.signal_name is not None
    return not count % every and self._agreed()

  def _agreed(self) -> bool:
    """Whether any process caught a signal (a collective: all processes call it together)."""
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.int32(self.signal_name is not None))
    if flags.max() and self.signal_name is None:
      self.signal_name = "another process's preemption signal"
    return bool(flags.max())
