"""The experiments runner: a tiny suite's table equals its runs' metrics, a stopped suite
resumes to the same table, bad suites fail before any run, runs get disjoint devices."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, small_config, small_settings

from alexnet_jax.core import files, storage
from alexnet_jax.core.errors import UserInputError
from alexnet_jax.studies import suites
from alexnet_jax.training import metrics, preemption, train

# Two variants with the same compiled steps (the noise is drawn in the input pipeline): the
# slow suite's time goes to the runner, not to compiling.
SUITE = """
def get_suite():
  return {"base": {}, "no_pca": {"pca_noise_std": 0.0}}
"""


def tiny(data_dir):
  return small_config(data_dir, num_train_steps=2, eval_every_steps=2, checkpoint_every_steps=1)


def write_suite(tmp_path, text=SUITE):
  path = tmp_path / "suite.py"
  path.write_text(text)
  return str(path)


def rows(table: str) -> dict:
  """{variant: cells} of results.md's table."""
  lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
  return {
    cells[0]: cells[1:]
    for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])
  }


@pytest.mark.slow
def test_a_tiny_suite_tables_its_runs_metrics_and_resumes_to_the_same_table(
  tmp_path, data_dir, monkeypatch
):
  """2 variants x 2 seeds x 2 steps, the first run stopped by a SIGTERM after step 1: the
  suite stops, and rerun it finishes. Its table holds its runs' numbers, and the stopped run
  ends as one never stopped."""
  suite, workdir = write_suite(tmp_path), tmp_path / "suite"
  calls, stops = [], []
  real = train.train_and_evaluate

  def counted(config, run_dir):
    calls.append(run_dir)
    return real(config, run_dir)

  def sigterm_after_step_1(self, step, every):  # as tests/system/test_resume.py's preemption
    if len(calls) == 1 and step == 1:
      self.signal_name = "SIGTERM"
      stops.append(step)
      return True
    return False

  monkeypatch.setattr(train, "train_and_evaluate", counted)
  monkeypatch.setattr(preemption.Watcher, "requested", sigterm_after_step_1)
  monkeypatch.setattr(preemption, "signals_received", lambda: len(stops))
  suites.run_suite(tiny(data_dir), suite, str(workdir), seeds=2)
  assert len(calls) == 1 and not (workdir / "base" / "seed0" / "DONE").exists()
  text = suites.run_suite(tiny(data_dir), suite, str(workdir), seeds=2)
  assert len(calls) == 5  # the stopped run again, then the three others
  table = rows(text)
  assert list(table) == ["base", "no_pca"]
  for variant in ("base", "no_pca"):
    finals = [
      [
        r
        for r in metrics.read_metrics(str(workdir / variant / f"seed{s}"))
        if "val/top1_error" in r
      ][-1]
      for s in (0, 1)
    ]
    for column, key in ((1, "val/top1_error"), (2, "val/top5_error")):
      errors = [r[key] for r in finals]
      assert (
        table[variant][column]
        == f"{100 * np.mean(errors):.1f} ± {100 * np.std(errors, ddof=1):.1f}"
      )
    assert table[variant][6:] == ["2", "2/2"]
  assert table["base"][4] == table["no_pca"][4]  # parameters: the same net
  for name in ("results.md", "curves.png"):
    assert os.path.getsize(workdir / name) > 0
  # The stopped run against the same run never stopped.
  straight = str(tmp_path / "straight")
  real(suites.plan(tiny(data_dir), {"base": ({}, "")}, 1, straight)[0].config, straight)

  def logged(run_dir):
    return [
      {k: v for k, v in r.items() if k != "images_per_sec"} for r in metrics.read_metrics(run_dir)
    ]

  assert logged(straight) == logged(str(workdir / "base" / "seed0"))
  report = suites.run_suite(tiny(data_dir), suite, str(workdir), seeds=2, report_only=True)
  assert report == text and len(calls) == 5
  assert suites.run_suite(tiny(data_dir), suite, str(workdir), seeds=2) == text
  assert len(calls) == 5  # every run finished: none trained again


@pytest.mark.parametrize(
  "text, overrides, message",
  [
    (
      "def get_suite():\n  return {'a': {'model.activaton': 'tanh'}}",
      {},
      "unknown config key 'model.activaton'",
    ),
    (
      "def get_suite():\n  return {'a': {'learning_rate': -1.0}}",
      {},
      "variant a: learning_rate=-1.0",
    ),
    (
      "def get_suite():\n  return {'a': {'model.activation': 'swish'}}",
      {},
      "variant a: the model settings",
    ),
    ("x = 1", {}, "defines no get_suite"),
    (None, {"suite": "ablatons"}, "use ablations, figure1 or FILE.py"),
    (None, {"seeds": 0}, "--seeds=0"),
    (None, {"runs_at_once": 9}, "--runs_at_once=9: use 1..8"),
  ],
)
def test_bad_suites_fail_before_any_run(tmp_path, data_dir, monkeypatch, text, overrides, message):
  monkeypatch.setattr(suites, "execute", None)  # no run may start
  args = dict(suite=write_suite(tmp_path, text) if text else "figure1", seeds=1, runs_at_once=1)
  args |= overrides
  config = small_config(data_dir)
  with pytest.raises(UserInputError, match=message) as error:
    suites.run_suite(
      config, args["suite"], str(tmp_path / "w"), args["seeds"], args["runs_at_once"]
    )
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_other_settings_for_an_existing_suite_are_refused(tmp_path, request, where):
  folder = str(tmp_path) if where == "local" else f"{request.getfixturevalue('gcs').bucket()}/s"
  suites.check_settings(folder, {"seeds": 2, "suite": {"a": {}}})
  suites.check_settings(folder, {"seeds": 2, "suite": {"a": {}}})  # the same: fine
  with pytest.raises(UserInputError, match=r"other settings \(suite differ\)"):
    suites.check_settings(folder, {"seeds": 2, "suite": {"a": {"seed": 1}}})
  suites.check_settings(folder, {"seeds": 3, "suite": {"a": {}}})  # a seed more
  assert '"seeds": 3' in storage.path(folder).joinpath(suites.SETTINGS).read_text()


def test_runs_side_by_side_get_disjoint_devices():
  devices = list(range(8))
  groups = suites.device_groups(devices, 4)
  assert groups == [[0, 1], [2, 3], [4, 5], [6, 7]]
  assert suites.device_groups(devices, 1) == [devices]
  assert sum(suites.device_groups(devices, 3), []) == list(range(6))  # equal shares
  with pytest.raises(UserInputError, match="runs_at_once=9"):
    suites.device_groups(devices, 9)


def test_first_reach_and_the_built_in_suites():
  epochs = np.array([0.5, 1.0, 1.5, 2.0])
  errors = np.array([[0.9, 0.4, 0.2, 0.1], [0.8, 0.3, 0.3, 0.1]])  # mean 0.85, 0.35, 0.25, 0.1
  assert suites.first_reach(epochs, errors, 0.25) == 1.5
  assert suites.first_reach(epochs, errors, 0.05) is None
  assert set(suites.ABLATIONS) == {
    "baseline",
    "tanh",
    "one_tower",
    "no_lrn",
    "no_overlap",
    "no_pca",
    "no_dropout",
  }
  assert all(
    re.match(r"§\d\.\d", claim) or v == "baseline" for v, (_, claim) in suites.ABLATIONS.items()
  )


def test_a_diverging_run_is_marked_and_the_suite_goes_on(tmp_path, monkeypatch):
  """A sweep's too-high rate: its run is DIVERGED in the table, the others still run, and a
  second call retrains neither."""
  suite = write_suite(
    tmp_path, 'def get_suite():\n  return {"high": {"learning_rate": 100.0}, "ok": {}}\n'
  )
  calls = []

  def trained(config, run_dir):  # the runner's side only: no steps are compiled
    calls.append(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    if config.learning_rate > 1:
      raise train.NonFiniteLoss("the loss, a gradient or a parameter became NaN/Inf at step 3")
    writer = metrics.MetricWriter(run_dir, steps_per_epoch=2)
    writer.write(2, {"train/top1_error": 0.5, "images_per_sec": 10.0})
    writer.write(2, {"val/top1_error": 0.25, "val/top5_error": 0.125})
    writer.close()
    return {}

  monkeypatch.setattr(train, "train_and_evaluate", trained)
  config, workdir = tiny(str(tmp_path / "data")), str(tmp_path / "suite")
  text = suites.run_suite(config, suite, workdir)
  table = rows(text)
  assert table["high"][1] == "-" and table["high"][-1] == "0/1, 1 diverged"
  assert table["ok"][1] == "25.0" and table["ok"][-1] == "1/1"
  assert "- high seed 0 diverged: the loss, a gradient or a parameter became NaN/Inf" in text
  assert suites.run_suite(config, suite, workdir) == text and len(calls) == 2


def test_the_readme_suites_plan_on_configs_ablations(tmp_path):
  """The README's measured command: every ablation of configs/ablations.py checks out, and
  its runs train 10 epochs of the 1,000-image embedded set."""
  from configs import ablations

  runs = suites.plan(ablations.get_config(), suites.ABLATIONS, 2, str(tmp_path))
  assert len(runs) == 14 and {r.config.num_epochs for r in runs} == {10}
  assert {r.config.synthetic_train_per_class for r in runs} == {100}
  assert runs[1].config.seed == 1 and runs[2].config.model.activation == "tanh"


def finished_figure1_runs(config, workdir: str) -> list:
  """Figure 1's two runs, finished, their training errors written by hand (5 steps an epoch):
  ReLU reaches 25% in epoch 2, tanh in epoch 4."""
  runs = suites.plan(config, suites.FIGURE1, 1, workdir)
  for run, errors in zip(runs, ([0.8, 0.2, 0.1, 0.1], [0.9, 0.8, 0.6, 0.2])):
    writer = metrics.MetricWriter(run.workdir, steps_per_epoch=5)
    for epoch, error in enumerate(errors, 1):
      writer.write(5 * epoch, {"train/top1_error": error, "images_per_sec": 1.0})
      writer.write(5 * epoch, {"val/top1_error": error, "val/top5_error": error / 2})
    writer.close()
    open(os.path.join(run.workdir, "DONE"), "w").write("finished\n")
  return runs


def test_report_only_reads_the_runs_files_and_imports_no_tensorflow(tmp_path):
  """`--report_only` redraws results.md from the runs' metrics lines: no dataset opened (the
  epochs are in the lines), and no TensorFlow imported (seconds and memory on a laptop)."""
  workdir, data_dir = str(tmp_path / "suite"), str(tmp_path / "data")
  finished_figure1_runs(tiny(data_dir), workdir)
  args = [
    "--suite=figure1",
    f"--workdir={workdir}",
    "--report_only",
    *(f"--config.{k}={v}" for k, v in small_settings(data_dir, {}).items()),
  ]
  script = (
    "import runpy, sys\n"
    f"sys.argv = ['experiments', *{args!r}]\n"
    "try:\n"
    "  runpy.run_module('alexnet_jax.experiments', run_name='__main__', alter_sys=True)\n"
    "except SystemExit as e:\n"
    "  assert not e.code, e.code\n"
    "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert "tanh takes 2.0x as long" in (tmp_path / "suite" / "results.md").read_text()
  assert not os.path.exists(data_dir)


def test_figure1_line_gives_the_epochs_to_the_target_and_their_ratio(tmp_path):
  """From the runs' own training errors (written here, 5 steps per epoch): ReLU at 25% in
  epoch 2, tanh in epoch 4: 2.0x; a target tanh never reaches names one it does."""
  config, workdir = tiny(str(tmp_path / "data")), str(tmp_path / "suite")
  runs = finished_figure1_runs(config, workdir)
  line = suites.figure1(workdir, runs, 0.25)
  assert "epoch 2.00 with ReLU (relu) and 4.00 with tanh: tanh takes 2.0x" in line
  assert os.path.exists(os.path.join(workdir, "figure1.png"))
  line = suites.figure1(workdir, runs, 0.15)
  assert "never with tanh" in line and "ReLU 10.0%, tanh 20.0%; --target_error=0.20" in line
  assert not os.path.exists(tmp_path / "data")  # the epochs came from the metrics lines


def test_a_suite_in_a_bucket_reports_from_its_runs_metrics(gcs, tmp_path):
  """--report_only on a suite folder in a bucket (its runs' metrics.jsonl and DONE files
  uploaded): results.md, curves.png and figure1.png are written there, whole."""
  local, suite_dir = str(tmp_path / "suite"), f"{gcs.bucket()}/suite"
  config = tiny(str(tmp_path / "data"))
  finished_figure1_runs(config, local)
  for path in (tmp_path / "suite").rglob("*"):
    if path.is_file():
      files.upload(str(path), f"{suite_dir}/{path.relative_to(local)}")
  text = suites.run_suite(config, "figure1", suite_dir, report_only=True)
  assert "tanh takes 2.0x as long" in text and rows(text)["relu"][-1] == "1/1"
  assert storage.path(f"{suite_dir}/results.md").read_text() == text
  names = {f.removeprefix(suite_dir + "/") for f in gcs.files(suite_dir)}
  assert {"results.md", "curves.png", "figure1.png"} <= names
  assert not os.path.exists(tmp_path / "data")
