"""Fault injection with real processes and signals: kills, preemption, broken checkpoints,
NaNs, unreadable images."""

import os
import signal
import time

import jax
import numpy as np
import pytest
from conftest import main_flags, params_of, random_params, small_config, start

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


def test_a_nan_loss_stops_the_run_naming_the_step_without_saving_it(copy_run, data_dir):
  """The shared run (a checkpoint at step 2) resumed with a NaN mean: step 3's loss is NaN. The
  mean is an argument of the step, not a constant in it: the same compiled step as any test's."""
  poisoned = dict(channel_mean=(float("nan"),) * 3, checkpoint_every_steps=1)
  workdir = copy_run()
  with pytest.raises(train.NonFiniteLoss, match=r"NaN/Inf at step 3;"):
    train.train_and_evaluate(config_for(data_dir, num_train_steps=4, **poisoned), workdir)
  mgr = checkpoints.manager(workdir, 3)
  assert mgr.all_steps() == [2]  # the broken state was not saved
  mgr.close()


@pytest.mark.slow
def test_a_nan_step_can_be_skipped_and_counted(copy_run, data_dir):
  """As above, with skip_nonfinite_steps: the parameters stay those of step 2."""
  poisoned = dict(channel_mean=(float("nan"),) * 3, checkpoint_every_steps=1)
  workdir, skipping = copy_run(), copy_run("skip")
  config = config_for(data_dir, num_train_steps=3, skip_nonfinite_steps=True, **poisoned)
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
