"""Both notebooks run end to end, unchanged but for their parameters cell, on the embedded data."""

import os

import nbformat
import pytest
from conftest import ROOT, small_settings
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(ROOT, "notebooks")


def execute(name, parameters):
  """Runs notebooks/NAME from its own folder, PARAMETERS placed after its parameters cell (as
  papermill does); a failing cell raises nbclient's CellExecutionError with the cell and its
  traceback."""
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  at = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", []))
  nb.cells.insert(at + 1, nbformat.v4.new_code_cell(parameters))
  NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}
  ).execute()
  return nb


def images_shown(nb):
  return sum(
    "image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", [])
  )


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, data_dir):
  """The quickstart notebook with the tests' small settings (its steps compile once per run)."""
  workdir = str(tmp_path_factory.mktemp("notebooks") / "run")
  overrides = small_settings(data_dir, {})
  nb = execute(
    "quickstart.ipynb",
    f"WORKDIR = {workdir!r}\nNUM_TRAIN_STEPS = 2\nOVERRIDES = {overrides!r}",
  )
  return workdir, nb


@pytest.mark.slow
def test_quickstart_notebook_trains_and_plots(quickstart):
  workdir, nb = quickstart
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
  assert os.path.exists(os.path.join(workdir, "training_curves.png")) and images_shown(nb) == 1


@pytest.mark.slow
def test_features_notebook_extracts_and_draws(quickstart, tmp_path):
  workdir, _ = quickstart
  out = str(tmp_path / "features")
  nb = execute(
    "features.ipynb",
    f"WORKDIR = {workdir!r}\nOUTPUT_DIR = {out!r}\nNUM_QUERIES = 3\nK = 4\nBATCH_SIZE = 8",
  )
  assert sorted(os.listdir(out)) == [
    "figure3_kernels.png",
    "figure4_neighbours.png",
    "figure4_predictions.png",
    "train.npz",
    "val.npz",
  ]
  assert images_shown(nb) == 3
