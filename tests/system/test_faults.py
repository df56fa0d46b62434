"""Fault injection with real processes and signals: kills, preemption, broken checkpoints,
NaNs, unreadable images, two runs on one workdir, a full disk."""

import dataclasses
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest
from conftest import (
  hold_lock,
  main_flags,
  params_of,
  random_params,
  small_config,
  start,
  write_image,
)

from alexnet_jax.core import locks
from alexnet_jax.core.errors import UserInputError
from alexnet_jax.data import datasets, prepare_shards
from alexnet_jax.model.alexnet import AlexNet
from alexnet_jax.studies import benchmark
from alexnet_jax.training import checkpoints, metrics, optim, steps, train

# Fault tests log every step and save and evaluate every 4.
SETTINGS = dict(log_every_steps=1, eval_every_steps=4, checkpoint_every_steps=4)


def config_for(data_dir, **overrides):
  return small_config(data_dir, **(SETTINGS | overrides))


def flags_for(data_dir, workdir, **overrides):
  return main_flags(data_dir, workdir, **(SETTINGS | overrides))


def wait_for_step(workdir, step, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if any(r["step"] >= step for r in metrics.read_metrics(workdir)):
      return
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.2)
  raise AssertionError(f"step {step} never logged")


def comparable(workdir):
  return [
    {k: v for k, v in r.items() if k != "images_per_sec"} for r in metrics.read_metrics(workdir)
  ]


@pytest.mark.slow
def test_sigkill_then_rerun_is_bit_identical_to_an_uninterrupted_run(tmp_path, data_dir):
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  run = start(flags_for(data_dir, straight, num_train_steps=12))
  assert run.wait(timeout=600) == 0, run.communicate()[1][-3000:]
  victim = start(flags_for(data_dir, killed, num_train_steps=12))
  wait_for_step(killed, 6, victim)  # past the checkpoint at step 4, before the one at 8
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  rerun = start(flags_for(data_dir, killed, num_train_steps=12))
  assert rerun.wait(timeout=600) == 0, rerun.communicate()[1][-3000:]
  for a, b in zip(jax.tree.leaves(params_of(straight)), jax.tree.leaves(params_of(killed))):
    np.testing.assert_array_equal(a, b)
  assert comparable(straight) == comparable(killed)


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_exits_cleanly(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  proc = start(
    flags_for(
      data_dir,
      workdir,
      num_train_steps=10_000,
      checkpoint_every_steps=10_000,
      eval_every_steps=10_000,
    )
  )
  wait_for_step(workdir, 3, proc)
  sent = time.time()
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert time.time() - sent < 60
  assert "SIGTERM received: saved a checkpoint at step" in err
  saved = checkpoints.manager(workdir, 3)
  step = saved.latest_step()
  saved.close()
  assert (
    step is not None and step >= 3 and step == max(r["step"] for r in metrics.read_metrics(workdir))
  )
  # The same command (here: a shorter run) continues from there.
  result = train.train_and_evaluate(
    config_for(
      data_dir, num_train_steps=step + 1, checkpoint_every_steps=10_000, eval_every_steps=10_000
    ),
    workdir,
  )
  assert "val/top1_error" in result
  assert [r["step"] for r in metrics.read_metrics(workdir) if "train/loss" in r][-2:] == [
    step,
    step + 1,
  ]


def test_a_half_written_checkpoint_is_ignored(copy_run, data_dir):
  """Beside the finished checkpoint at step 2, an unfinished one at step 12: the rerun of the
  finished run restores step 2 (the unfinished one would not restore) and evaluates it."""
  workdir = copy_run()
  junk = os.path.join(workdir, "checkpoints", "12.orbax-checkpoint-tmp-1234567")
  os.makedirs(os.path.join(junk, "state"))
  with open(os.path.join(junk, "state", "half"), "wb") as f:
    f.write(b"\0" * 100)
  result = train.train_and_evaluate(small_config(data_dir), workdir)
  assert "val/top1_error" in result
  assert [r["step"] for r in metrics.read_metrics(workdir) if "train/loss" in r] == [1, 2]


def poison_the_mean(monkeypatch) -> None:
  """The data's mean image NaN from here on (a changed channel_mean would be refused on
  resume): the mean is an argument of the step, not a constant in it, so the step compiled is
  the same as any test's."""
  load = datasets.load_splits

  def poisoned(*args, **kwargs):
    data = load(*args, **kwargs)
    nan = np.full_like(data.stats.mean_image, np.nan)
    return data._replace(stats=dataclasses.replace(data.stats, mean_image=nan))

  monkeypatch.setattr(datasets, "load_splits", poisoned)


def test_a_nan_loss_stops_the_run_naming_the_step_without_saving_it(
  copy_run, data_dir, monkeypatch
):
  """The shared run (a checkpoint at step 2) resumed with a NaN mean: step 3's loss is NaN."""
  workdir = copy_run()
  poison_the_mean(monkeypatch)
  with pytest.raises(train.NonFiniteLoss, match=r"NaN/Inf at step 3;"):
    config = config_for(data_dir, num_train_steps=4, checkpoint_every_steps=1)
    train.train_and_evaluate(config, workdir)
  mgr = checkpoints.manager(workdir, 3)
  assert mgr.all_steps() == [2]  # the broken state was not saved
  mgr.close()


@pytest.mark.slow
def test_a_nan_step_can_be_skipped_and_counted(copy_run, data_dir, monkeypatch):
  """As above, with skip_nonfinite_steps: the parameters stay those of step 2."""
  workdir, skipping = copy_run(), copy_run("skip")
  poison_the_mean(monkeypatch)
  config = config_for(
    data_dir, num_train_steps=3, skip_nonfinite_steps=True, checkpoint_every_steps=1
  )
  train.train_and_evaluate(config, skipping)
  last = [r for r in metrics.read_metrics(skipping) if "train/loss" in r][-1]
  assert last["step"] == 3 and last["train/skipped_steps"] == 1
  for a, b in zip(jax.tree.leaves(params_of(skipping, 3)), jax.tree.leaves(params_of(workdir))):
    np.testing.assert_array_equal(a, b)


def test_a_step_that_overflows_the_parameters_is_not_finite():
  """An infinite rate: the loss and gradients are finite, the updated parameters are not. The
  step says so, and notes its number for the train loop, which then saves nothing of it."""
  model = AlexNet(num_classes=10)
  params = random_params(model, 67)
  tx = optim.paper_sgd(float("inf"))
  step = jax.jit(steps.make_train_step(model, tx, seed=0))
  state, out = step(
    steps.new_state(params, tx.init(params)),
    benchmark.synthetic_batch(4, 67, train=True),
    np.zeros((67, 67, 3), np.float32),
  )
  assert np.isfinite(out["train/loss"]) and not out["finite"]
  assert int(state.log["first_nonfinite"]) == 1


def test_a_failed_evaluation_saves_its_step_first(copy_run, data_dir, monkeypatch):
  """The evaluation at step 3, the last, raises: step 3 is saved anyway, its evaluation
  pending, and the rerun evaluates step 3, once (the pending evaluation comes first after a
  preemption too, before training goes on: tests/system/test_resume.py)."""
  workdir = copy_run()
  config = config_for(data_dir, num_train_steps=3, eval_every_steps=3, checkpoint_every_steps=4)

  def broken(*args):
    raise OSError("the validation disk went away")

  with monkeypatch.context() as m:
    m.setattr(train, "evaluate", broken)
    with pytest.raises(OSError, match="validation disk"):
      train.train_and_evaluate(config, workdir)
  mgr = checkpoints.manager(workdir, 3)
  assert mgr.all_steps() == [2, 3]
  mgr.close()
  train.train_and_evaluate(config, workdir)
  evals = [r["step"] for r in metrics.read_metrics(workdir) if "val/top1_error" in r]
  assert evals == [2, 3]


def snapshot(folder) -> dict:
  """Every file under folder with its size and modification time: what a refused run must
  leave as it was."""
  return {
    os.path.relpath(os.path.join(root, name), folder): (
      os.path.getsize(os.path.join(root, name)),
      os.path.getmtime(os.path.join(root, name)),
    )
    for root, _, names in os.walk(folder)
    for name in names
  }


@pytest.mark.slow
def test_a_second_run_on_a_running_workdir_is_refused_and_touches_nothing(tmp_path, data_dir):
  """While a real training process runs in a workdir, a second run there is a one-line error
  before it writes anything; the first then stops cleanly and leaves no lock behind."""
  workdir = str(tmp_path / "run")
  first = start(flags_for(data_dir, workdir, num_train_steps=10_000, eval_every_steps=10_000))
  try:
    wait_for_step(workdir, 1, first)
    first.send_signal(signal.SIGSTOP)  # nothing moves while we look
    before = snapshot(workdir)
    with pytest.raises(UserInputError, match=f"workdir {workdir} is in use by pid {first.pid} "):
      train.train_and_evaluate(config_for(data_dir, num_train_steps=2), workdir)
    assert snapshot(workdir) == before
  finally:
    first.send_signal(signal.SIGCONT)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
  assert first.returncode == 0, err[-3000:]
  assert not os.path.exists(os.path.join(workdir, locks.LOCK_FILE))


def test_a_workdir_held_by_a_live_process_is_refused_before_anything_is_touched(copy_run, data_dir):
  workdir = copy_run()
  holder = hold_lock(workdir)
  try:
    before = snapshot(workdir)
    with pytest.raises(UserInputError, match=f"is in use by pid {holder.pid} ") as refused:
      train.train_and_evaluate(config_for(data_dir, num_train_steps=4), workdir)
    assert "\n" not in str(refused.value)
    with pytest.raises(UserInputError, match="is in use by"):
      train.evaluate_checkpoint(config_for(data_dir), workdir)
    assert snapshot(workdir) == before
  finally:
    holder.kill()
    holder.wait()


def test_a_stale_lock_of_a_dead_run_is_taken_over(copy_run, data_dir, caplog):
  """A run killed with SIGKILL leaves its lock: the rerun on the same host sees its pid gone,
  says so and goes on; it removes the lock when it ends."""
  workdir = copy_run()
  dead = subprocess.Popen(["true"])
  dead.wait()
  lock = os.path.join(workdir, locks.LOCK_FILE)
  with open(lock, "w") as f:
    json.dump({"host": socket.gethostname(), "pid": dead.pid, "since": "yesterday"}, f)
  with caplog.at_level(logging.WARNING):
    assert "val/top1_error" in train.train_and_evaluate(config_for(data_dir), workdir)
  assert f"pid {dead.pid} on host {socket.gethostname()}" in caplog.text
  assert "is no longer running" in caplog.text and not os.path.exists(lock)


def test_a_prepare_on_a_data_dir_in_use_is_refused(tmp_path):
  folder = tmp_path / "images"
  for split in ("train", "val"):
    write_image(str(folder / split / "cat" / "0.jpg"), "RGB", (64, 64), 50)
  holder = hold_lock(tmp_path / "out")
  try:
    with pytest.raises(UserInputError, match=f"data dir {tmp_path / 'out'} is in use by pid"):
      prepare_shards.prepare(str(folder), str(tmp_path / "out"), workers=1)
    with pytest.raises(UserInputError, match="is in use by"):
      prepare_shards.to_raw(str(tmp_path / "out"))
  finally:
    holder.kill()
    holder.wait()
  assert os.listdir(tmp_path / "out") == [locks.LOCK_FILE]  # the holder's, killed: stale


class FullDisk:
  """An open file whose write stores half of what it is given, then fails as a full disk does."""

  def __init__(self, f):
    self.f = f

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.f.close()

  def write(self, text):
    self.f.write(text[: len(text) // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.slow
def test_a_full_disk_during_a_metrics_write_is_one_line_and_the_rerun_resumes(
  copy_run, data_dir, monkeypatch
):
  """Resumed from step 2, the disk fills while step 4's line is written: a one-line error, a
  torn last line; the rerun drops it (and step 3's line, past the checkpoint) and finishes."""
  workdir = copy_run()
  config = config_for(data_dir, num_train_steps=4)
  appends = []

  def filling(path, mode="r", *args, **kwargs):
    f = open(path, mode, *args, **kwargs)
    appends.extend([path] if mode == "a" else [])
    return FullDisk(f) if mode == "a" and len(appends) == 2 else f  # step 3's line, then 4's

  with monkeypatch.context() as m:
    m.setattr(metrics, "open", filling, raising=False)
    with pytest.raises(UserInputError, match=f"the disk holding {workdir} is full"):
      train.train_and_evaluate(config, workdir)
  assert not open(os.path.join(workdir, "metrics.jsonl")).read().endswith("\n")  # torn
  train.train_and_evaluate(config, workdir)
  records = metrics.read_metrics(workdir)
  assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]
  assert [r["step"] for r in records if "val/top1_error" in r] == [2, 4]


@pytest.fixture
def small_disk(tmp_path):
  """A 200 MB tmpfs (the shared run's checkpoint takes 150 MB), grown by calling the result
  with a new size; needs root, and skips without."""
  mount = tmp_path / "disk"
  mount.mkdir()
  if (
    os.geteuid() != 0
    or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(mount)]).returncode
  ):
    pytest.skip("mounting a tmpfs needs root")

  def resize(size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)

  resize.path = mount
  yield resize
  subprocess.run(["umount", "--lazy", str(mount)], check=True)


@pytest.mark.slow
def test_a_checkpoint_on_a_full_disk_is_one_line_and_keeps_the_previous(
  trained_run, data_dir, small_disk
):
  workdir = shutil.copytree(
    trained_run, small_disk.path / "run", ignore=shutil.ignore_patterns(".built")
  )
  config = config_for(data_dir, num_train_steps=3, checkpoint_every_steps=3, eval_every_steps=3)
  with pytest.raises(UserInputError, match=f"the disk holding {workdir} is full") as full:
    train.train_and_evaluate(config, str(workdir))
  assert "\n" not in str(full.value)
  mgr = checkpoints.manager(str(workdir), 3)
  assert mgr.all_steps() == [2]
  mgr.close()
  for a, b in zip(jax.tree.leaves(params_of(workdir)), jax.tree.leaves(params_of(trained_run))):
    np.testing.assert_array_equal(a, b)
  small_disk("600m")
  train.train_and_evaluate(config, str(workdir))
  assert [r["step"] for r in metrics.read_metrics(workdir) if "train/loss" in r] == [1, 2, 3]
