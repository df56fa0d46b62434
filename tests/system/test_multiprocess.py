"""Several processes: two processes on this machine train like one, and a process that cannot
reach its coordinator says so in one line."""

import os

import jax
import numpy as np
import pytest
from conftest import main_flags, params_of, start

from alexnet_jax.training import metrics


@pytest.mark.long  # 3 processes, each compiling: over 2 minutes on 2 cores
def test_two_processes_train_like_one(tmp_path, data_dir):
  """2 processes x 2 CPU devices (launch.sh) end with the parameters of 1 process x 4 devices."""
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  single = start(main_flags(data_dir, one, num_train_steps=3, num_devices=0), devices=4)
  assert single.wait(timeout=600) == 0, single.communicate()[1][-3000:]
  pair = start(
    main_flags(data_dir, two, num_train_steps=3, num_devices=0),
    devices=2,
    launcher=("bash", "launch.sh"),
    env={"NUM_PROCESSES": "2", "COORDINATOR_PORT": str(20000 + os.getpid() % 20000)},
  )
  out, err = pair.communicate(timeout=600)
  assert pair.returncode == 0, err[-3000:]
  # Restored on a third layout. The gradients' all-reduce sums 4 shards in another order
  # (two processes over gloo): float32 rounding of the updates, far below these tolerances.
  for a, b in zip(jax.tree.leaves(params_of(one)), jax.tree.leaves(params_of(two))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  steps = [r["step"] for r in metrics.read_metrics(two) if "train/loss" in r]
  assert steps == [1, 2, 3]  # written once, by process 0


def test_an_unreachable_coordinator_is_a_one_line_error(tmp_path, data_dir):
  proc = start(
    main_flags(data_dir, str(tmp_path / "w"), num_train_steps=1)
    + [
      "--coordinator_address=127.0.0.1:9",
      "--num_processes=2",
      "--process_id=1",
      "--coordinator_timeout=1",
    ]
  )
  _, err = proc.communicate(timeout=120)
  assert proc.returncode != 0
  assert (
    err.strip().splitlines()[-1].startswith("error: process 1 of 2 could not join the coordinator")
  )
  assert not os.path.exists(tmp_path / "w")
