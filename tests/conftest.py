"""Shared set-up: eight simulated CPU devices, one compilation cache, small configs, and the
expensive fixtures (the embedded data, one tiny trained workdir) built once per test run.

Everything in the environment is set before JAX is imported, so that subprocesses and
notebook kernels the tests start inherit it.
"""

import os
import shutil
import subprocess
import sys
import tempfile

_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"  # shared by xdist workers
_CACHE = os.path.join(tempfile.gettempdir(), f"alexnet_jax_tests_{_RUN}", "jax_cache")

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Many tests compile the same small programs (the quickstart net's train and eval steps on
# the same meshes); XLA's persistent cache compiles each once per test run, for every
# worker, subprocess and notebook kernel. The executables are the same, so are the numbers.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import filelock  # noqa: E402
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The embedded data, small: 80 train and 20 val images, 5 steps of 16 per epoch.
TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 2


def pytest_sessionfinish(session):
  if not hasattr(session.config, "workerinput"):  # the controller, after every worker is done
    shutil.rmtree(os.path.dirname(_CACHE), ignore_errors=True)


def _settings(data_dir: str, overrides: dict) -> dict:
  return {
    "data_dir": data_dir,
    "synthetic_train_per_class": TRAIN_PER_CLASS,
    "synthetic_val_per_class": VAL_PER_CLASS,
    "batch_size": 16,
    "num_train_steps": 2,
    "log_every_steps": 1,
    "eval_every_steps": 2,
    "checkpoint_every_steps": 2,
    "lr_schedule": "constant",
  } | overrides


def small_config(data_dir: str, **overrides):
  """configs/quickstart.py shrunk for tests: the small embedded data, batch 16 (2 per device),
  a constant rate, 2 steps, every step logged, evaluated and saved at step 2."""
  from configs import quickstart

  config = quickstart.get_config()
  for key, value in _settings(data_dir, overrides).items():
    config[key] = value
  return config


def main_flags(data_dir: str, workdir: str, **overrides) -> list[str]:
  """small_config as `python -m alexnet_jax.main` flags."""
  settings = _settings(data_dir, overrides)
  return [f"--workdir={workdir}", "--config=configs/quickstart.py"] + [
    f"--config.{k}={v}" for k, v in settings.items()
  ]


def start(args, devices=8, launcher=(sys.executable, "-m", "alexnet_jax.main"), env=None):
  """A training process (or `launcher`) on `devices` simulated CPU devices; `env` is added."""
  return subprocess.Popen(
    [*launcher, *args],
    cwd=ROOT,
    env={**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    | (env or {}),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def params_of(workdir: str, step: int | None = None):
  """A checkpoint's parameters as numpy arrays, restored on one device."""
  import jax

  from alexnet_jax import sharding
  from alexnet_jax.restore import restore

  mesh = sharding.make_mesh(1, jax.devices()[:1])
  return jax.device_get(restore(workdir, step=step, mesh=mesh).params)


def _built_once(tmp_path_factory, worker_id: str, name: str, build) -> str:
  """A folder made by build(path) once per test run, whatever the number of xdist workers."""
  root = tmp_path_factory.getbasetemp()
  if worker_id != "master":
    root = root.parent  # the run's folder, above each worker's own
  path = root / name
  with filelock.FileLock(str(path) + ".lock"):
    if not (path / ".built").exists():
      shutil.rmtree(path, ignore_errors=True)
      build(str(path))
      (path / ".built").touch()
  return str(path)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, worker_id) -> str:
  """The embedded dataset, small (read-only: copy it to change it)."""
  from alexnet_jax import synthetic

  return _built_once(
    tmp_path_factory,
    worker_id,
    "data",
    lambda path: synthetic.generate(
      path, train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS, seed=0
    ),
  )


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, worker_id, data_dir) -> str:
  """A workdir trained for 2 steps on 8 devices (a data-parallel 8x1 mesh), checkpoint at 2.
  Read-only: tests that write into a workdir copy it first (`copy_run`)."""
  from alexnet_jax import train

  return _built_once(
    tmp_path_factory,
    worker_id,
    "trained_run",
    lambda path: train.train_and_evaluate(small_config(data_dir), path),
  )


@pytest.fixture
def copy_run(trained_run, tmp_path):
  """A private copy of the trained workdir, to resume or damage."""

  def copy(name: str = "run") -> str:
    return shutil.copytree(trained_run, tmp_path / name, ignore=shutil.ignore_patterns(".built"))

  return copy
