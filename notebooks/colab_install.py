"""The notebooks' install step on Colab: what the repository needs, without breaking what the
runtime already has. The notebooks run it in their kernel (`runpy.run_path`), so it can tell
which packages that kernel has imported.

  python notebooks/colab_install.py     # the same from a shell, in the environment to fix

- requirements.txt, but never a second TensorFlow. Colab's CPU and GPU runtimes ship the
  `tensorflow` distribution; requirements/tensorflow.txt names `tensorflow-cpu` (the same
  package as a smaller wheel), which pip would unpack into the same tensorflow/ folder over it,
  and the next `import tensorflow` fails (undefined symbols). Where any TensorFlow
  distribution is installed, only requirements/package.txt is installed; where none is
  (Colab's TPU runtime), requirements/tensorflow.txt too.
- pip's default upgrade strategy, "only if needed": a package that is there and within
  requirements.txt's range stays as it is.
- JAX for the accelerator: `jax[cuda12]` on a GPU, `jax[tpu]` on a TPU, resolved in the same pip
  run as requirements/package.txt's jax range. jax's extras pin the CUDA plugin (or libtpu) and
  jaxlib to exactly jax's own version, so pip installs a jax whose plugin exists, with its
  plugin: installing jax first and then `jax[cuda12]==V` fails when V's plugin is not
  published (jax 0.12.1 has none; 0.12.0.1 has). A TPU is found the way JAX finds one: the
  `libtpu` package, or a PCI device of Google's vendor id 0x1ae0.
- A package the kernel had imported and pip replaced needs a restart of the runtime: one line
  says so and the cell stops (SystemExit); run it again after the restart and it goes on.

Only the standard library: it runs before anything is installed.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys

TENSORFLOWS = ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tf-nightly", "tf-nightly-cpu")
TPU_PCI_VENDOR = "0x1ae0"  # Google: JAX's own test for a TPU VM (jax/_src/cloud_tpu_init.py)


def _name(distribution: str) -> str:
  return re.sub(r"[-_.]+", "-", distribution).lower()


def _installed() -> dict[str, str]:
  """Every installed distribution's normalised name -> its version."""
  return {
    _name(d.metadata["Name"]): d.version
    for d in importlib.metadata.distributions()
    if d.metadata["Name"]
  }


def install_arguments(repo: str, installed: dict[str, str], extra: str | None) -> list[str]:
  """pip's arguments: the package's requirements, TensorFlow's only where no TensorFlow
  distribution is installed, and JAX's accelerator extra (`extra`) where there is one."""
  args = ["-r", os.path.join(repo, "requirements", "package.txt")]
  if not any(name in installed for name in TENSORFLOWS):
    args += ["-r", os.path.join(repo, "requirements", "tensorflow.txt")]
  return args + ([f"jax[{extra}]"] if extra else [])


def accelerator() -> str | None:
  """The accelerator's JAX extra, "tpu" or "cuda12", or None for a CPU: from what the machine
  has, not from variables a runtime may or may not set."""
  if importlib.util.find_spec("libtpu") is not None:
    return "tpu"
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      if open(vendor).read().strip() == TPU_PCI_VENDOR:
        return "tpu"
    except OSError:
      pass
  if shutil.which("nvidia-smi") or os.path.exists("/proc/driver/nvidia/version"):
    return "cuda12"
  return None


def _pip(args: list[str]) -> None:
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], check=True)


def replaced_but_imported(before: dict[str, str], after: dict[str, str]) -> list[str]:
  """Distributions pip changed that own a module this process has already imported."""
  changed = {name for name, version in after.items() if before.get(name) != version}
  loaded = {
    os.path.realpath(f) for m in list(sys.modules.values()) if (f := getattr(m, "__file__", None))
  }
  hits = set()
  for d in importlib.metadata.distributions():
    name = _name(d.metadata["Name"] or "")
    if name in changed and any(os.path.realpath(d.locate_file(f)) in loaded for f in d.files or ()):
      hits.add(name)
  return sorted(hits)


def main(repo: str = ".") -> None:
  before = _installed()
  extra = accelerator()
  _pip(install_arguments(repo, before, extra))
  after = _installed()
  print(
    f"installed for {extra or 'cpu'}: jax {after.get('jax')}, jaxlib {after.get('jaxlib')}, "
    f"cuda plugin {after.get('jax-cuda12-plugin')}, libtpu {after.get('libtpu')}, flax "
    f"{after.get('flax')}, tensorflow {next((after[t] for t in TENSORFLOWS if t in after), None)}"
  )
  stale = replaced_but_imported(before, after)
  if stale:
    raise SystemExit(
      f"restart the runtime (Runtime > Restart session) and run this cell again: pip replaced "
      f"{', '.join(stale)}, which this kernel had already imported"
    )


if __name__ == "__main__":
  main(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
