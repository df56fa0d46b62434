"""Processes that disagree: two processes started with other settings are refused at start, on
both, in one line; a process whose peer never comes ends with a message, not a hang."""

import os
import sys
import time

import numpy as np
import pytest
from conftest import main_flags, small_config, start

from alexnet_jax.data.datasets import Data
from alexnet_jax.data.sources import Split
from alexnet_jax.data.stats import Stats
from alexnet_jax.training import agreement


def _port(offset: int) -> str:
  return str(21000 + (os.getpid() * 7 + offset) % 20000)


def _process(args: list[str], index: int, port: str, launcher=None):
  """Process `index` of 2 (coordinator on 127.0.0.1:port) running main with `args`."""
  env = {
    "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
    "JAX_NUM_PROCESSES": "2",
    "JAX_PROCESS_ID": str(index),
  }
  return start(args, env=env, **({"launcher": launcher} if launcher else {}))


def _last_line(proc, timeout: float) -> str:
  _, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 1, err[-3000:]
  return err.strip().splitlines()[-1]


def _data(train_size: int = 8, classes=("a", "b"), mean: float = 0.0) -> Data:
  split = Split(tuple(f"{i}.jpg" for i in range(train_size)), np.zeros(train_size), classes)
  stats = Stats(np.full((4, 4, 3), mean), np.ones(3), np.eye(3))
  return Data(split, Split(("v.jpg",), np.zeros(1), classes), stats)


def test_the_message_names_each_process_key_and_both_values(data_dir):
  config = small_config(data_dir)
  lead = agreement.summary(config, _data())
  assert agreement.disagreement([lead, lead]) is None
  config.num_train_steps = 7
  other = agreement.summary(config, _data(train_size=9, classes=("a", "c"), mean=1.0))
  message = agreement.disagreement([lead, lead, other])
  assert "\n" not in message
  assert message.startswith(
    "the 3 processes do not run the same job: process 2 has --config.num_train_steps=7 "
    "(process 0: 2), data.classes=2 names, sha256 "
  )
  assert "data.statistics=sha256 " in message and "data.train_images=9 (process 0: 8);" in message
  assert message.endswith("start every process with the same flags and config, on the same data")


def test_each_host_may_read_its_own_copy_of_the_data(data_dir, tmp_path):
  """data_dir may differ (a local copy per host): the data it holds is compared instead."""
  here = agreement.summary(small_config(data_dir), _data())
  there = agreement.summary(small_config(str(tmp_path)), _data())
  assert agreement.disagreement([here, there]) is None


@pytest.mark.slow  # two processes
def test_processes_with_other_step_counts_both_stop_at_start(tmp_path, data_dir):
  """Before: both trained side by side, then one waited for the other forever."""
  port, workdir = _port(0), str(tmp_path / "w")
  procs = [
    _process(main_flags(data_dir, workdir, num_train_steps=steps, num_devices=0), index, port)
    for index, steps in enumerate((2, 3))
  ]
  started = time.monotonic()
  expected = (
    "error: the 2 processes do not run the same job: process 1 has --config.num_train_steps=3 "
    "(process 0: 2); start every process with the same flags and config, on the same data"
  )
  try:
    assert [_last_line(p, timeout=150) for p in procs] == [expected, expected]
  finally:
    for p in procs:
      p.kill()
  assert time.monotonic() - started < 150  # at start: nothing compiled or trained
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


_SILENT_PEER = """
import sys, time, jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", 2, 1)
jax.devices()  # joins the run's topology, then never takes part in a collective
time.sleep(300)
"""


@pytest.mark.slow  # two processes
def test_a_peer_that_never_comes_ends_the_run_with_a_message(tmp_path, data_dir):
  """Process 1 joins the runtime but never reaches a collective operation: process 0 ends
  with one line instead of waiting for ever."""
  port = _port(1)
  flags = main_flags(data_dir, str(tmp_path / "w"), dataset="image_folder", num_devices=0)
  lead = _process(flags + ["--collective_timeout=5"], 0, port)
  peer = start(["-c", _SILENT_PEER, port], launcher=(sys.executable,))
  try:
    line = _last_line(lead, timeout=240)
  finally:
    lead.kill()
    peer.kill()
  assert line.startswith("error: process 0 of 2 waited too long for the others (")
  assert line.endswith(
    "another process stopped, hung or runs something else; see its log. The limit on a "
    "collective operation is --collective_timeout=5 s"
  )
