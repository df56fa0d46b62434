"""Fault injection with real processes and signals: kills, preemption, broken checkpoints,
NaNs, unreadable images, restoring on other meshes and process counts."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from alexnet_jax import checkpoints, metrics, restore, synthetic, train
from alexnet_jax.errors import UserInputError
from configs import quickstart

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = dict(
  synthetic_train_per_class=8,
  synthetic_val_per_class=2,
  batch_size=16,
  log_every_steps=1,
  eval_every_steps=4,
  checkpoint_every_steps=4,
  lr_schedule="constant",
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("data"))
  synthetic.generate(path, train_per_class=8, val_per_class=2, seed=0)
  return path


def config_for(data_dir, **overrides):
  config = quickstart.get_config()
  for key, value in (SETTINGS | {"data_dir": data_dir} | overrides).items():
    config[key] = value
  return config


def flags_for(data_dir, workdir, **overrides):
  args = [f"--workdir={workdir}", "--config=configs/quickstart.py"]
  return args + [
    f"--config.{k}={v}" for k, v in (SETTINGS | {"data_dir": data_dir} | overrides).items()
  ]


def start(args, devices=4, launcher=(sys.executable, "-m", "alexnet_jax.main"), env=None):
  env = {
    **os.environ,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    **(env or {}),
  }
  return subprocess.Popen(
    [*launcher, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )


def wait_for_step(workdir, step, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if any(r["step"] >= step for r in metrics.read_metrics(workdir)):
      return
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.2)
  raise AssertionError(f"step {step} never logged")


def params_of(workdir, step=None):
  return jax.device_get(
    restore.restore(workdir, step=step, mesh=sharding.make_mesh(1, jax.devices()[:1])).params
  )


def assert_same_params(a, b, **tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if tol:
      np.testing.assert_allclose(x, y, **tol)
    else:
      np.testing.assert_array_equal(x, y)


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
  assert_same_params(params_of(straight), params_of(killed))
  assert comparable(straight) == comparable(killed)


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


def test_a_half_written_checkpoint_is_ignored(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config_for(data_dir, num_train_steps=8), workdir)
  junk = os.path.join(workdir, "checkpoints", "12.orbax-checkpoint-tmp-1234567")
  os.makedirs(os.path.join(junk, "state"))
  with open(os.path.join(junk, "state", "half"), "wb") as f:
    f.write(b"\0" * 100)
  result = train.train_and_evaluate(config_for(data_dir, num_train_steps=9), workdir)
  assert "val/top1_error" in result
  assert [r["step"] for r in metrics.read_metrics(workdir) if "train/loss" in r] == list(
    range(1, 10)
  )


def test_a_nan_loss_stops_the_run_naming_the_step_without_saving_it(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  config = config_for(
    data_dir, num_train_steps=12, learning_rate=1e12, checkpoint_every_steps=1, log_every_steps=4
  )
  with pytest.raises(train.NonFiniteLoss, match=r"NaN/Inf at step (\d+)") as err:
    train.train_and_evaluate(config, workdir)
  bad = int(err.value.args[0].split("at step ")[1].split(";")[0])
  mgr = checkpoints.manager(workdir, 3)
  assert all(s < bad for s in mgr.all_steps())
  mgr.close()
  for leaf in jax.tree.leaves(params_of(workdir)):
    assert np.all(np.isfinite(leaf))
  # Or skip such steps and count them.
  skipping = config_for(data_dir, num_train_steps=6, learning_rate=1e12, skip_nonfinite_steps=True)
  train.train_and_evaluate(skipping, str(tmp_path / "skip"))
  last = [r for r in metrics.read_metrics(str(tmp_path / "skip")) if "train/loss" in r][-1]
  assert last["train/skipped_steps"] >= 1
  for leaf in jax.tree.leaves(params_of(str(tmp_path / "skip"))):
    assert np.all(np.isfinite(leaf))


def test_an_unreadable_image_is_skipped_and_counted(tmp_path, data_dir):
  folder = tmp_path / "images"
  for split in ("train", "val"):
    for c in ("a", "b"):
      os.makedirs(folder / split / c)
      for i in range(9 if split == "train" else 2):
        Image.fromarray(np.full((40, 40, 3), 25 * i, np.uint8)).save(
          folder / split / c / f"{i}.png"
        )
  (folder / "train" / "a" / "9.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  config = config_for(str(folder), dataset="image_folder", num_classes=2, num_train_steps=2)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  last = [r for r in metrics.read_metrics(str(tmp_path / "run")) if "train/loss" in r][-1]
  assert 1 <= last["train/skipped_images"] <= 2  # once per presentation: 2 steps span 2 epochs here


def test_a_4x2_checkpoint_restores_on_1_2x1_and_1x2_and_trains_on(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config_for(data_dir, num_train_steps=2, model_parallelism=2), workdir)
  x = jax.random.normal(jax.random.key(0), (4, 67, 67, 3)) * 50
  logits = []
  for model, devices in ((1, 1), (1, 2), (2, 2)):
    r = restore.restore(workdir, mesh=sharding.make_mesh(model, jax.devices()[:devices]))
    logits.append(np.asarray(r.model.apply({"params": r.params}, x)))
  for other in logits[1:]:
    np.testing.assert_allclose(other, logits[0], rtol=1e-5, atol=1e-5)
  train.train_and_evaluate(
    config_for(data_dir, num_train_steps=3, model_parallelism=2, num_devices=2), workdir
  )
  assert [r["step"] for r in metrics.read_metrics(workdir) if "train/loss" in r] == [1, 2, 3]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, data_dir):
  """2 processes x 2 CPU devices (launch.sh) end with the parameters of 1 process x 4 devices."""
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  single = start(flags_for(data_dir, one, num_train_steps=3))
  assert single.wait(timeout=600) == 0, single.communicate()[1][-3000:]
  pair = start(
    flags_for(data_dir, two, num_train_steps=3),
    devices=2,
    launcher=("bash", "launch.sh"),
    env={"NUM_PROCESSES": "2", "COORDINATOR_PORT": str(20000 + os.getpid() % 20000)},
  )
  out, err = pair.communicate(timeout=600)
  assert pair.returncode == 0, err[-3000:]
  assert_same_params(
    params_of(one), params_of(two), rtol=1e-5, atol=1e-6
  )  # restored on a third layout
  steps = [r["step"] for r in metrics.read_metrics(two) if "train/loss" in r]
  assert steps == [1, 2, 3]  # written once, by process 0


def test_an_unreachable_coordinator_is_a_one_line_error(tmp_path, data_dir):
  proc = start(
    flags_for(data_dir, str(tmp_path / "w"), num_train_steps=1)
    + [
      "--coordinator_address=127.0.0.1:9",
      "--num_processes=2",
      "--process_id=1",
      "--coordinator_timeout=5",
    ]
  )
  _, err = proc.communicate(timeout=120)
  assert proc.returncode != 0
  assert (
    err.strip().splitlines()[-1].startswith("error: process 1 of 2 could not join the coordinator")
  )
  assert not os.path.exists(tmp_path / "w")


def test_a_resume_with_another_batch_size_is_refused(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config_for(data_dir, num_train_steps=1), workdir)
  with pytest.raises(UserInputError, match="batch_size=16, not 32"):
    train.train_and_evaluate(config_for(data_dir, num_train_steps=2, batch_size=32), workdir)
  mgr = checkpoints.manager(workdir, 3)
  assert mgr.all_steps() == [1]  # nothing saved was touched
  mgr.close()
