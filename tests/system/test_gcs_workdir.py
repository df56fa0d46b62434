"""`--workdir=gs://bucket/run` against a real GCS server (fake-gcs-server, the `gcs` fixture):
every file of a workdir lands in the bucket and nothing on the local disk; a run killed
there resumes bit for bit; two processes share it, a second run is refused; `--mode=eval`
and `init_from` read it."""

import os
import signal
import tempfile
import time
from typing import NamedTuple

import jax
import numpy as np
import pytest
from conftest import ROOT, main_flags, params_of, small_config, start

from alexnet_jax.core import files
from alexnet_jax.core.errors import UserInputError
from alexnet_jax.training import metrics, pretrained, train
from alexnet_jax.training.config_check import check_config

# Log every step, save and evaluate every 4 (tests/system/test_faults.py's settings).
SETTINGS = dict(log_every_steps=1, eval_every_steps=4, checkpoint_every_steps=4)


def finished(proc) -> str:
  """The stderr of a process that must succeed."""
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return err


class BucketRun(NamedTuple):
  workdir: str  # gs://BUCKET/run, trained for 2 steps
  tmp: str  # the run's TMPDIR: local temporary files
  root_before: set  # the repository's top level (the process's cwd) before the run


@pytest.fixture(scope="module")
def bucket_run(gcs, data_dir, tmp_path_factory) -> BucketRun:
  """A 2-step run (evaluated and saved at step 2) whose workdir is in a bucket."""
  workdir, tmp = f"{gcs.bucket()}/run", tmp_path_factory.mktemp("tmpdir")
  before = set(os.listdir(ROOT))
  finished(start(main_flags(data_dir, workdir), env={"TMPDIR": str(tmp)}))
  return BucketRun(workdir, str(tmp), before)


def scalars(gcs_file: str) -> dict:
  """{(tag, step): value} of a TensorBoard event file in the bucket, read as TensorBoard
  would (TensorFlow's reader, on a downloaded copy: its own GCS client ignores the server)."""
  import tensorflow as tf

  with tempfile.TemporaryDirectory() as folder:
    local = os.path.join(folder, "events")
    files.download(gcs_file, local)
    return {
      (value.tag, event.step): float(tf.make_ndarray(value.tensor))
      for event in tf.compat.v1.train.summary_iterator(local)
      for value in event.summary.value
    }


@pytest.mark.slow
def test_a_run_keeps_its_whole_workdir_in_the_bucket(gcs, bucket_run):
  workdir = bucket_run.workdir
  names = {f.removeprefix(workdir + "/") for f in gcs.files(workdir)}
  for name in ("config.json", "classes.json", "data.json", "stats.npz", "metrics.jsonl"):
    assert name in names
  assert "checkpoints/2/commit_success.txt" in names  # orbax's mark of a finished step
  (events,) = [n for n in names if n.startswith("tensorboard/events.out.tfevents.")]
  assert "alexnet_jax.lock" not in names  # released at the end
  records = metrics.read_metrics(workdir)
  assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
  losses = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
  logged = scalars(f"{workdir}/{events}")
  assert {s: logged[("train/loss", s)] for s in (1, 2)} == pytest.approx(losses)
  # Nothing written locally: no gs:/ folder in the cwd, no temporary file left behind.
  assert set(os.listdir(ROOT)) <= bucket_run.root_before
  assert os.listdir(bucket_run.tmp) == []


@pytest.mark.slow
def test_eval_mode_reads_and_logs_in_the_bucket(bucket_run, data_dir):
  proc = start(main_flags(data_dir, bucket_run.workdir) + ["--mode=eval"])
  finished(proc)
  evals = [r for r in metrics.read_metrics(bucket_run.workdir) if "val/top1_error" in r]
  assert [r["step"] for r in evals] == [2, 2] and "val/eval_crops" in evals[-1]
  assert evals[-1]["val/top1_error"] == evals[0]["val/top1_error"]


@pytest.mark.slow
def test_init_from_a_workdir_in_a_bucket(bucket_run, data_dir):
  """A workdir of ours in a bucket as init_from: accepted by the config check, read through
  orbax from the bucket, the same parameters a restore gives; a missing one refused."""
  config = small_config(data_dir, init_from=bucket_run.workdir)
  check_config(config)
  params, trained_with, what = pretrained.load(bucket_run.workdir)
  assert what == f"checkpoint {bucket_run.workdir}/checkpoints/2"
  assert trained_with == config.model.to_dict()
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_of(bucket_run.workdir))):
    np.testing.assert_array_equal(a, b)
  config.init_from = bucket_run.workdir + "-missing"
  with pytest.raises(UserInputError, match=r"init_from='gs://.*/run-missing' does not exist"):
    check_config(config)


def wait_for_step(workdir: str, step: int, proc, timeout: float = 300) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if any(r["step"] >= step for r in metrics.read_metrics(workdir)):
      return
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.5)
  raise AssertionError(f"step {step} never logged in {workdir}")


def comparable(workdir: str) -> list[dict]:
  return [
    {k: v for k, v in r.items() if k != "images_per_sec"} for r in metrics.read_metrics(workdir)
  ]


@pytest.mark.slow
def test_a_run_killed_in_a_bucket_resumes_bit_exactly(gcs, data_dir, tmp_path):
  """SIGKILL after the checkpoint at step 4 and before the one at 8; the rerun resumes from
  the bucket and ends with the parameters and metrics of a run never stopped (on local disk)."""
  straight, killed = str(tmp_path / "straight"), f"{gcs.bucket()}/killed"
  flags = dict(SETTINGS, num_train_steps=10)
  reference = start(main_flags(data_dir, straight, **flags))
  victim = start(main_flags(data_dir, killed, **flags))
  wait_for_step(killed, 6, victim)
  # Checkpoints are written asynchronously: on a loaded machine step 4's may still be in
  # flight at step 6. Kill once it is committed (step 8's cannot be before it).
  deadline = time.time() + 120
  while f"{killed}/checkpoints/4/commit_success.txt" not in gcs.files(killed):
    assert time.time() < deadline and victim.poll() is None, "step 4's checkpoint never committed"
    time.sleep(0.2)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  assert f"{killed}/checkpoints/8/commit_success.txt" not in gcs.files(killed)
  err = finished(start(main_flags(data_dir, killed, **flags)))
  assert f"resumed from {killed}/checkpoints at step 4" in err
  finished(reference)
  for a, b in zip(jax.tree.leaves(params_of(straight)), jax.tree.leaves(params_of(killed))):
    np.testing.assert_array_equal(a, b)
  assert comparable(killed) == comparable(straight)


@pytest.mark.slow
def test_two_processes_share_a_bucket_workdir_and_a_second_run_is_refused(gcs, data_dir):
  """launch.sh's 2 processes write one checkpoint into the bucket (each its shards), both
  resume from it, process 0 alone logs; a second run on the workdir is a one-line error."""
  workdir = f"{gcs.bucket()}/pair"
  env = {"NUM_PROCESSES": "2", "COORDINATOR_PORT": str(20000 + (os.getpid() + 7) % 20000)}

  def pair(steps: int):
    flags = main_flags(data_dir, workdir, num_train_steps=steps, num_devices=0, **SETTINGS)
    return start(flags, devices=1, launcher=("bash", "launch.sh"), env=env)

  finished(pair(4))
  names = gcs.files(f"{workdir}/checkpoints/4")
  assert any("ocdbt.process_0/" in n for n in names) and any("ocdbt.process_1/" in n for n in names)
  resumed = pair(8)
  try:
    wait_for_step(workdir, 5, resumed)
    with pytest.raises(UserInputError, match=rf"workdir {workdir} is in use by pid \d+ ") as e:
      train.train_and_evaluate(small_config(data_dir, num_train_steps=8), workdir)
    assert "\n" not in str(e.value)
  finally:
    err = finished(resumed)
  assert err.count(f"resumed from {workdir}/checkpoints at step 4") == 2  # each process
  steps = [r["step"] for r in metrics.read_metrics(workdir) if "train/loss" in r]
  assert steps == list(range(1, 9))  # each written once, by process 0
