"""A folder has one owner at a time: a second live process is refused, a dead one's lock is
taken over, another host's is left alone with a way out. The holders are real processes."""

import json
import logging
import os
import signal
import socket
import time

import pytest
from conftest import hold_lock

from alexnet_jax.core import locks
from alexnet_jax.core.errors import UserInputError


def lock_naming(folder, **owner) -> str:
  path = os.path.join(folder, locks.LOCK_FILE)
  with open(path, "w") as f:
    json.dump({"since": "2024-01-01T00:00:00"} | owner, f)
  return path


def test_a_live_holder_is_refused_and_its_lock_taken_over_once_it_is_killed(tmp_path, caplog):
  proc = hold_lock(tmp_path)
  try:
    with pytest.raises(UserInputError) as refused:
      locks.take(str(tmp_path), "workdir", "use another --workdir")
    message = str(refused.value)
    assert f"workdir {tmp_path} is in use by pid {proc.pid} on host {socket.gethostname()}" in (
      message
    )
    assert "use another --workdir" in message and "remove" not in message  # alive: checked
    assert "\n" not in message
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  with caplog.at_level(logging.WARNING), locks.take(str(tmp_path), "workdir", "x") as lock:
    assert json.load(open(lock.path))["pid"] == os.getpid()
  assert f"pid {proc.pid} on host" in caplog.text and "no longer running" in caplog.text
  assert os.listdir(tmp_path) == []  # released, and no stale copy left


def test_a_killed_holder_not_yet_reaped_is_stale(tmp_path):
  """SIGKILLed, its parent (here, this test) not having waited for it: a zombie holds nothing,
  and a rerun started right after the kill takes its lock over."""
  proc = hold_lock(tmp_path)
  proc.send_signal(signal.SIGKILL)
  try:
    for _ in range(400):  # until the kernel has made it a zombie (up to 20 s on a busy machine)
      with open(f"/proc/{proc.pid}/stat") as f:
        if f.read().rsplit(")", 1)[1].split()[0] == "Z":
          break
      time.sleep(0.05)
    with locks.take(str(tmp_path), "workdir", "x") as lock:
      assert json.load(open(lock.path))["pid"] == os.getpid()
  finally:
    proc.wait()


def test_a_pid_now_used_by_another_process_is_stale(tmp_path):
  """Our own pid, alive, but recorded with another start: a process before us had it."""
  lock_naming(tmp_path, host=socket.gethostname(), pid=os.getpid(), process_start=1)
  with locks.take(str(tmp_path), "workdir", "x"):
    pass


def test_another_hosts_lock_is_refused_saying_how_to_remove_it(tmp_path):
  path = lock_naming(tmp_path, host="elsewhere", pid=1, command="python -m alexnet_jax.main")
  with pytest.raises(UserInputError, match=f"in use by pid 1 on host elsewhere.*remove {path}$"):
    locks.take(str(tmp_path), "workdir", "wait")
  assert os.path.exists(path)


def test_a_damaged_lock_is_refused_saying_how_to_remove_it(tmp_path):
  path = os.path.join(tmp_path, locks.LOCK_FILE)
  open(path, "w").close()
  with pytest.raises(UserInputError, match=f"unknown process.*remove {path}$"):
    locks.take(str(tmp_path), "workdir", "wait")


def test_the_same_thread_may_take_it_again_until_its_last_release(tmp_path):
  """prepare(fmt="raw") calls to_raw: both hold the data dir."""
  outer = locks.take(str(tmp_path), "data dir", "x")
  with locks.take(str(tmp_path), "data dir", "x") as inner:
    assert inner is outer
  assert os.path.exists(outer.path)
  outer.release()
  assert not os.path.exists(outer.path)


def test_a_release_leaves_a_lock_that_replaced_ours(tmp_path):
  lock = locks.take(str(tmp_path), "workdir", "x")
  lock_naming(tmp_path, host="elsewhere", pid=1)
  lock.release()
  assert os.path.exists(lock.path)
