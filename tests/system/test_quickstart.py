"""The README's first command, run as a user runs it: it must learn the embedded data."""

import os
import subprocess
import sys

import pytest

from alexnet_jax.core.errors import UserInputError
from alexnet_jax.training import metrics, train
from configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.long
def test_quickstart_reaches_90_percent_top1(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a laptop
  workdir = str(tmp_path / "quickstart")
  subprocess.run(
    [
      sys.executable,
      "-m",
      "alexnet_jax.main",
      "--config=configs/quickstart.py",
      f"--workdir={workdir}",
    ],
    cwd=ROOT,
    env=env,
    check=True,
    capture_output=True,
    timeout=1200,
  )
  evals = [r for r in metrics.read_metrics(workdir) if "val/top1_error" in r]
  assert evals[-1]["step"] == 1116
  assert evals[-1]["val/top1_error"] <= 0.10, evals


def test_the_paper_recipe_without_imagenet_is_one_line(tmp_path):
  """configs/default.py as typed before preparing ImageNet: what to do, in one line (which the
  command prints as `error: ...`: tests/core/test_cli.py), before anything is compiled."""
  with pytest.raises(UserInputError, match=r"^no prepared dataset at data_dir=''") as error:
    train.train_and_evaluate(default.get_config(), str(tmp_path))
  assert "\n" not in str(error.value) and "python -m alexnet_jax.prepare" in str(error.value)
