"""`pip install git+URL` of the repository: the package with its dependencies declared, and no
TensorFlow forced over a runtime's own (it is the `tensorflow-cpu` extra)."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import ROOT
from packaging.requirements import Requirement


def _requirements(name: str) -> list[str]:
  with open(os.path.join(ROOT, "requirements", name)) as f:
    return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


@pytest.mark.slow
def test_the_wheel_declares_the_package_and_its_dependencies(tmp_path):
  source = tmp_path / "source"  # a copy: building in place would leave build/ in the repository
  source.mkdir()
  for name in ("pyproject.toml", "README.md", "requirements", "alexnet_jax"):
    copy = shutil.copytree if os.path.isdir(os.path.join(ROOT, name)) else shutil.copy
    copy(os.path.join(ROOT, name), source / name)
  subprocess.run(
    [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(source),
     "-w", str(tmp_path)],
    check=True,
  )  # fmt: skip
  (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
  with zipfile.ZipFile(tmp_path / wheel) as z:
    names = z.namelist()
    metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
  requires = [
    line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist")
  ]
  plain = [r for r in requires if "extra ==" not in r]
  extra = [r.split(";")[0].strip() for r in requires if "extra ==" in r]
  norm = lambda rs: sorted((r.name.lower(), str(r.specifier)) for r in map(Requirement, rs))
  assert norm(plain) == norm(_requirements("package.txt"))
  assert norm(extra) == norm(_requirements("tensorflow.txt"))
  assert not any("tensorflow-cpu" in r for r in plain)
  assert "alexnet_jax/training/train.py" in names and "alexnet_jax/data/synthetic.py" in names
  # Installed (its dependencies are this environment's), it runs from anywhere.
  target = tmp_path / "site"
  subprocess.run(
    [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
     str(tmp_path / wheel)],
    check=True,
  )  # fmt: skip
  out = subprocess.run(
    [
      sys.executable,
      "-c",
      "import alexnet_jax.training.recipes as r; print(r.__file__, r.paper().batch_size)",
    ],
    cwd=tmp_path,
    env={**os.environ, "PYTHONPATH": str(target)},
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  assert out.startswith(str(target)) and out.split()[-1] == "128"
