"""The notebooks as a new user runs them on today's Colab: a Python 3.13 environment holding
Colab's preinstalled packages (notebooks/colab_versions.txt), a kernel that is Colab's (it has
imported `google.colab`), a clone of this repository as REPO_URL, the install cell as it is.

Python 3.13 comes from pyenv (`pyenv prefix 3.13.0`) or ALEXNET_JAX_PYTHON313. Without it the
test skips, unless ALEXNET_JAX_REQUIRE_COLAB=1 (CI), where that is a failure. The notebooks run
from a clone of the repository's last commit: what REPO_URL gives a user.
"""

import json
import os
import subprocess
import sys

import nbformat
import pytest
from conftest import ROOT, small_settings
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

RESTART = "restart the runtime"
# What JAX and etils import when they see Colab: `google.colab.output`.
FAKE_COLAB = {
  "__init__.py": '"""Stands for Colab\'s own package: the kernel is Colab\'s."""\n',
  "output.py": "def eval_js(*args, **kwargs):\n  return None\n",
}


def _python313() -> str | None:
  if os.environ.get("ALEXNET_JAX_PYTHON313"):
    return os.environ["ALEXNET_JAX_PYTHON313"]
  try:
    prefix = subprocess.run(
      ["pyenv", "prefix", "3.13.0"], capture_output=True, text=True, check=True
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None
  python = os.path.join(prefix, "bin", "python3")
  return python if os.path.exists(python) else None


@pytest.fixture(scope="module")
def colab(tmp_path_factory):
  """A Python 3.13 environment as Colab's runtime has it, with a kernel spec named "colab"."""
  python = _python313()
  if python is None:
    message = "no Python 3.13: install it with pyenv or set ALEXNET_JAX_PYTHON313"
    if os.environ.get("ALEXNET_JAX_REQUIRE_COLAB") == "1":
      pytest.fail(message)
    pytest.skip(message)
  root = tmp_path_factory.mktemp("colab")
  env = root / "env"
  subprocess.run([python, "-m", "venv", str(env)], check=True)
  pip = [str(env / "bin" / "python"), "-m", "pip", "install", "-q"]
  versions = os.path.join(ROOT, "notebooks", "colab_versions.txt")
  subprocess.run(pip + ["-r", versions], check=True)
  site = subprocess.run(
    [str(env / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  colab_dir = os.path.join(site, "google", "colab")
  os.makedirs(colab_dir)
  for name, text in FAKE_COLAB.items():
    with open(os.path.join(colab_dir, name), "w") as f:
      f.write(text)
  with open(os.path.join(site, "zz_colab_kernel.pth"), "w") as f:
    f.write("import google.colab\n")  # Colab's kernels import it at start
  spec = root / "jupyter" / "kernels" / "colab"
  spec.mkdir(parents=True)
  argv = [str(env / "bin" / "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
  (spec / "kernel.json").write_text(json.dumps({"argv": argv, "language": "python"}))
  os.environ["JUPYTER_PATH"] = str(root / "jupyter")
  clone = root / "repo"
  subprocess.run(["git", "clone", "-q", ROOT, str(clone)], check=True)
  return root, f"file://{clone}"


def run_in_colab(root, repo_url: str, name: str, parameters: str) -> nbformat.NotebookNode:
  """notebooks/NAME of the clone, its install cell pointed at REPO_URL (cloned into the
  Colab root, as /content/alexnet_jax), PARAMETERS after its parameters cell; restarted once and
  run again when the install cell asks for it, as a user would."""
  clone_dir = str(root / "content" / "alexnet_jax")
  nb = nbformat.read(os.path.join(repo_url[len("file://") :], "notebooks", name), as_version=4)
  install = nb.cells[1]
  assert 'REPO_URL = ""' in install.source and '"/content/alexnet_jax"' in install.source
  install.source = install.source.replace('REPO_URL = ""', f"REPO_URL = {repo_url!r}")
  install.source = install.source.replace('"/content/alexnet_jax"', repr(clone_dir))
  at = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", []))
  nb.cells.insert(at + 1, nbformat.v4.new_code_cell(parameters))
  os.makedirs(root / "content", exist_ok=True)
  for attempt in range(2):
    client = NotebookClient(
      nb, timeout=900, kernel_name="colab", resources={"metadata": {"path": str(root / "content")}}
    )
    try:
      return client.execute()
    except CellExecutionError as e:
      if RESTART not in str(e) or attempt:
        raise
  raise AssertionError("unreachable")


def outputs(cell) -> str:
  return "".join(o.get("text", "") + str(o.get("evalue", "")) for o in cell.get("outputs", []))


@pytest.mark.slow
def test_both_notebooks_run_on_todays_colab(colab, data_dir):
  root, repo_url = colab
  workdir = str(root / "run")
  overrides = small_settings(data_dir, {})
  quickstart = run_in_colab(
    root,
    repo_url,
    "quickstart.ipynb",
    f"WORKDIR = {workdir!r}\nNUM_TRAIN_STEPS = 2\nOVERRIDES = {overrides!r}",
  )
  installed = outputs(quickstart.cells[1])
  # Colab's TensorFlow kept (no tensorflow-cpu over it); JAX the newest pip gives Python 3.13.
  assert "installed for cpu" in installed and "tensorflow 2.20.0" in installed, installed
  assert "jax 0.7.2" not in installed, installed
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
  assert "mesh: 4 data x 2 model over 8 cpu device(s)" in "".join(
    outputs(c) for c in quickstart.cells
  )
  out = str(root / "features")
  run_in_colab(
    root,
    repo_url,
    "features.ipynb",
    f"WORKDIR = {workdir!r}\nOUTPUT_DIR = {out!r}\nNUM_QUERIES = 3\nK = 4\nBATCH_SIZE = 8",
  )
  assert {"train.npz", "val.npz", "figure3_kernels.png"} <= set(os.listdir(out))


def test_the_install_step_keeps_a_present_tensorflow():
  sys.path.insert(0, os.path.join(ROOT, "notebooks"))
  try:
    import colab_install
  finally:
    sys.path.pop(0)
  package, tensorflow = (
    os.path.join(ROOT, "requirements", f) for f in ("package.txt", "tensorflow.txt")
  )
  args = colab_install.install_arguments
  assert args(ROOT, {"tensorflow": "2.20.0"}, None) == ["-r", package]
  assert args(ROOT, {"jax": "0.7.2"}, None) == ["-r", package, "-r", tensorflow]
  assert args(ROOT, {"tensorflow": "2.20.0"}, "cuda12") == ["-r", package, "jax[cuda12]"]
  # pytest itself is imported here: a changed pytest would need a restart, an unknown one not.
  import importlib.metadata

  real = importlib.metadata.version("pytest")
  assert colab_install.replaced_but_imported({"pytest": "0.0"}, {"pytest": real}) == ["pytest"]
  assert colab_install.replaced_but_imported({"left-pad": "1"}, {"left-pad": "2"}) == []
