"""A run stopped anywhere and resumed ends with the numbers of a run never stopped: the same
metrics.jsonl (but images/s) and the same parameters, bit for bit, whatever the log,
checkpoint and evaluation intervals, the plateau schedule's drops and the counters included.

Preemption is simulated in-process at chosen steps (the watcher reports a SIGTERM there), or
sent as a real signal to this process during an evaluation; a signal to a training process is
tests/system/test_faults.py's."""

import os
import shutil
import signal

import jax
import numpy as np
import pytest
from conftest import params_of, small_config

from alexnet_jax.data import sources
from alexnet_jax.data.batches import train_batches
from alexnet_jax.data.stats import load_stats
from alexnet_jax.training import checkpoints, metrics, preemption, steps, train


def preempt_at(monkeypatch, steps: set) -> None:
  """The watcher reports a SIGTERM right after each of `steps`."""

  def requested(self, step, every):
    if step in steps:
      self.signal_name = "SIGTERM"
    return step in steps

  monkeypatch.setattr(preemption.Watcher, "requested", requested)


def comparable(workdir: str) -> list[dict]:
  return [
    {k: v for k, v in r.items() if k != "images_per_sec"} for r in metrics.read_metrics(workdir)
  ]


def run_stopping_at(config, workdir: str, stops: list[int], monkeypatch) -> None:
  """Trains to the end, preempted after each of `stops` and rerun after each preemption."""
  for stop in stops:
    with monkeypatch.context() as m:
      preempt_at(m, {stop})
      train.train_and_evaluate(config, workdir)
    mgr = checkpoints.manager(workdir, 3)
    assert mgr.latest_step() == stop
    mgr.close()
  train.train_and_evaluate(config, workdir)


@pytest.mark.slow
def test_any_intervals_and_the_plateau_schedule_resume_exactly(tmp_path, data_dir, monkeypatch):
  """Logs every 3 steps, saves every 5, evaluates every 2 under the plateau rule (patience 1, a
  rate too small to change the validation error: it drops at steps 4 and 6). Stopped after
  step 4: in the middle of a log interval, and at an evaluation step, which the resumed run
  evaluates first, dropping the rate as the straight run did."""
  config = small_config(
    data_dir,
    num_train_steps=6,
    log_every_steps=3,
    checkpoint_every_steps=5,
    eval_every_steps=2,
    lr_schedule="plateau",
    learning_rate=1e-6,
    plateau_patience=1,
    skip_nonfinite_steps=True,
  )
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.train_and_evaluate(config, straight)
  run_stopping_at(config, resumed, [4], monkeypatch)
  assert comparable(resumed) == comparable(straight)
  logged = [r for r in metrics.read_metrics(straight) if "train/loss" in r]
  rates = {r["step"]: r["learning_rate"] for r in logged}
  assert rates[3] == pytest.approx(1e-6) and rates[6] == pytest.approx((1e-6 + 2e-7) / 3)
  for a, b in zip(jax.tree.leaves(params_of(resumed)), jax.tree.leaves(params_of(straight))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_counters_continue_across_a_resume(tmp_path, data_dir, monkeypatch):
  """Skipped steps (every step: the mean image is NaN) and unreadable images (every fifth
  training file broken) count the whole run, not the last resume's part. Stopped after step 2
  of 3; the image counts are the input stream's own, read without training."""
  folder = shutil.copytree(data_dir, tmp_path / "images")
  for path in sorted((folder / "train").glob("*/*.jpg"))[::5]:
    path.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
  config = small_config(
    str(folder),
    dataset="image_folder",
    num_train_steps=3,
    eval_every_steps=3,
    checkpoint_every_steps=3,
    skip_nonfinite_steps=True,
    channel_mean=(float("nan"),) * 3,
  )
  workdir = str(tmp_path / "run")
  run_stopping_at(config, workdir, [2], monkeypatch)
  logged = {r["step"]: r for r in metrics.read_metrics(workdir) if "train/loss" in r}
  assert [logged[s]["train/skipped_steps"] for s in sorted(logged)] == [1, 2, 3]

  def skipped(start_step: int, batches: int) -> int:
    split = sources.read_image_folder(str(folder)).train
    stream = train_batches(
      split,
      batch_size=16,
      image_size=config.image_size,
      resize_size=config.resize_size,
      stats=load_stats("", config.resize_size, (0.0,) * 3),  # no effect on order
      seed=config.seed,
      start_step=start_step,
    )
    for _ in range(batches):
      next(stream)
    return stream.skipped

  before = skipped(0, 2)
  assert before >= 1 and logged[2]["train/skipped_images"] == before
  assert logged[3]["train/skipped_images"] == before + skipped(2, 1)


@pytest.mark.slow
def test_a_sigterm_during_an_evaluation_saves_its_step_and_the_rerun_evaluates_it(
  copy_run, data_dir, monkeypatch
):
  """Resumed from step 2 to 4, a real SIGTERM arrives during the first batch of step 4's
  evaluation (two batches): the second is not run, step 4 is saved with its evaluation pending,
  and the rerun evaluates it, once."""
  workdir = copy_run()
  config = small_config(data_dir, num_train_steps=4, eval_every_steps=4, checkpoint_every_steps=4)
  batches = []
  jit_steps = steps.jit_steps

  def signalling(*args, **kwargs):
    jitted = jit_steps(*args, **kwargs)

    def evaluate(*inputs):
      batches.append(len(batches))
      if len(batches) == 1:
        os.kill(os.getpid(), signal.SIGTERM)
      return jitted.evaluate(*inputs)

    return jitted._replace(evaluate=evaluate)

  with monkeypatch.context() as m:
    m.setattr(steps, "jit_steps", signalling)
    assert train.train_and_evaluate(config, workdir) == {}
  assert batches == [0]
  mgr = checkpoints.manager(workdir, 3)
  assert mgr.all_steps() == [2, 4]
  mgr.close()
  assert [r["step"] for r in metrics.read_metrics(workdir) if "val/top1_error" in r] == [2]
  train.train_and_evaluate(config, workdir)
  records = metrics.read_metrics(workdir)
  assert [r["step"] for r in records if "val/top1_error" in r] == [2, 4]
  assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]
