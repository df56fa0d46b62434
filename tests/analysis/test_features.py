"""A real 2-step run, restored on other meshes and extracted: same features whatever the mesh or
batch size, a folder with a broken image (API, and CLI in the slow suite), the one-command
figures, one line per bad input."""

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, TRAIN_PER_CLASS, assert_close

from alexnet_jax.analysis import dtype_agreement, featurefile, features, paper_figures
from alexnet_jax.core import storage
from alexnet_jax.core.errors import UserInputError
from alexnet_jax.data import datasets, synthetic
from alexnet_jax.model import backend, sharding
from alexnet_jax.training import checkpoints
from alexnet_jax.training.restore import restore


@pytest.fixture(scope="module")
def run(trained_run):
  """The shared 2-step workdir, trained on 2 devices (a data-parallel 2x1 mesh)."""
  return trained_run


def mesh(data, model):
  return sharding.make_mesh(model, jax.devices()[: data * model])


@pytest.fixture(scope="module")
def val_features(run, tmp_path_factory):
  """The val split's features on one device, batch 4: the reference the other tests compare with."""
  path = str(tmp_path_factory.mktemp("features") / "val.npz")
  report = features.extract_split(restore(run, mesh=mesh(1, 1)), run, "val", path, batch_size=4)
  assert report.count == 20 and report.skipped == ()
  return featurefile.read(path)


def test_features_file_contents(val_features):
  f = val_features
  assert f["fc7"].shape == (20, 4096) and f["fc7"].dtype == np.float32
  assert f["top5_index"].shape == f["top5_prob"].shape == (20, 5)
  assert np.all(np.diff(f["top5_prob"], axis=1) <= 0) and np.all(f["top5_prob"].sum(1) <= 1 + 1e-6)
  assert f["classes"].tolist() == list(synthetic.CLASSES) and int(f["step"]) == 2
  assert f["label"].tolist() == [c for c in range(10) for _ in range(2)]
  assert [p.split(os.sep)[-2] for p in f["path"]] == [synthetic.CLASSES[c] for c in f["label"]]


@pytest.mark.parametrize("data, model, batch_size", [(1, 1, 7), (1, 2, 6), (4, 2, 8), (8, 1, 24)])
def test_same_features_on_any_mesh_and_batch_size(
  run, val_features, tmp_path, data, model, batch_size
):
  """A checkpoint written on 2 devices restores on 1, 2 (one tower each) and 8; padding never
  changes a row."""
  restored = restore(run, mesh=mesh(data, model))
  assert dict(restored.params["conv1"]["kernel"].sharding.mesh.shape) == {
    "data": data,
    "model": model,
  }
  path = str(tmp_path / "val.npz")
  features.extract_split(restored, run, "val", path, batch_size=batch_size)
  f = featurefile.read(path)
  assert_close(f["fc7"], val_features["fc7"], rtol=1e-5)  # other meshes, other sum orders
  np.testing.assert_array_equal(f["top5_index"], val_features["top5_index"])
  np.testing.assert_array_equal(f["path"], val_features["path"])


def folder_of_three(tmp_path, val_features) -> tuple:
  """Three val images in nested folders, a broken one and a text file: (folder, {row: file})."""
  folder = tmp_path / "images"
  os.makedirs(folder / "nested" / "deeper")
  picked = {
    0: folder / "a.jpg",
    7: folder / "nested" / "b.jpg",
    19: folder / "nested" / "deeper" / "c.jpg",
  }
  for row, target in picked.items():
    shutil.copy(val_features["path"][row], target)
  (folder / "nested" / "broken.jpg").write_text("not an image")
  (folder / "notes.txt").write_text("ignored")
  return folder, picked


def assert_features_of(output, picked, val_features):
  f = featurefile.read(output)
  assert f["path"].tolist() == sorted(str(p) for p in picked.values())
  by_path = dict(zip(f["path"].tolist(), f["fc7"]))
  for row, target in picked.items():  # preprocessed exactly as the split: same features
    assert_close(by_path[str(target)], val_features["fc7"][row], rtol=1e-5)
  assert f["label"].tolist() == [-1] * 3 and f["classes"].tolist() == list(synthetic.CLASSES)


def test_a_folder_skips_and_names_an_unreadable_image(run, val_features, tmp_path, monkeypatch):
  """The class names come from the run's classes.json: its dataset is not opened (for the
  embedded data that would generate it again where it is missing)."""
  monkeypatch.setattr(datasets, "load_splits", lambda *_: pytest.fail("the dataset was opened"))
  folder, picked = folder_of_three(tmp_path, val_features)
  output = str(tmp_path / "out" / "folder.npz")
  report = features.extract_folder(restore(run, mesh=mesh(1, 1)), run, str(folder), output, 8)
  assert report.count == 3 and report.skipped == (str(folder / "nested" / "broken.jpg"),)
  assert_features_of(output, picked, val_features)


@pytest.mark.slow
def test_the_cli_on_a_folder_reports_what_it_wrote_and_skipped(run, val_features, tmp_path):
  folder, picked = folder_of_three(tmp_path, val_features)
  output = str(tmp_path / "out" / "folder.npz")
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "alexnet_jax.extract",
      f"--workdir={run}",
      f"--images={folder}",
      f"--output={output}",
      "--batch_size=8",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert (
    f"wrote 3 images to {output}; skipped 1 unreadable: {folder / 'nested' / 'broken.jpg'}"
    in result.stdout
  )
  assert "skipped unreadable image" in result.stderr
  assert_features_of(output, picked, val_features)


@pytest.mark.parametrize("where", ["local", pytest.param("bucket", marks=pytest.mark.slow)])
def test_paper_figures_in_one_call(run, tmp_path, request, where):
  folder = str(tmp_path) if where == "local" else request.getfixturevalue("gcs").bucket()
  out = paper_figures.run(run, f"{folder}/figs", num_queries=3, k=4, batch_size=8)
  figs = storage.path(f"{folder}/figs")
  assert sorted(p.name for p in figs.iterdir()) == sorted(paper_figures.FILES.values())
  assert storage.path(out["kernels"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert len(featurefile.read(out["train"])["path"]) == 10 * TRAIN_PER_CLASS


def test_bad_inputs_are_one_line_errors(run, tmp_path):
  def fails(match, fn, *args, **kwargs):
    with pytest.raises(UserInputError, match=match) as e:
      fn(*args, **kwargs)
    assert "\n" not in str(e.value)

  fails("has no checkpoints/: train first", restore, str(tmp_path))
  shutil.copytree(os.path.join(run, "checkpoints"), tmp_path / "no_config" / "checkpoints")
  fails("has checkpoints but no config.json", restore, str(tmp_path / "no_config"))
  (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
  shutil.copy(os.path.join(run, checkpoints.CONFIG_FILE), tmp_path / "unfinished")
  fails("holds no finished checkpoint", restore, str(tmp_path / "unfinished"))
  fails(
    "holds a 'paper' net, not 'torchvision': pass --variant=paper",
    restore,
    run,
    variant="torchvision",
  )
  fails(r"no checkpoint at step 7; it has steps \[2\]", restore, run, step=7)
  fails("unknown dtype 'float16': use one of float32, bfloat16", restore, run, dtype="float16")
  (tmp_path / "empty" / "sub").mkdir(parents=True)
  (tmp_path / "empty" / "sub" / "readme.txt").write_text("x")
  fails("no .jpg/.jpeg/.png images in", features.find_images, str(tmp_path / "empty"))
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "x.png").write_bytes(b"\x89PNG broken")
  fails(
    "none of the 1 images in .* could be read",
    features.extract_folder,
    restore(run),
    run,
    str(tmp_path / "bad"),
    str(tmp_path / "o.npz"),
  )
  fails(
    "batch_size=12 does not divide over the 8 devices",
    features.extract_split,
    restore(run),
    run,
    "val",
    str(tmp_path / "o.npz"),
    batch_size=12,
  )
  assert not os.path.exists(tmp_path / "o.npz")


@pytest.mark.slow  # a process of its own; the message itself: test_bad_inputs_are_one_line_errors
def test_cli_error_is_one_line(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "alexnet_jax.extract",
      f"--workdir={tmp_path}",
      f"--images={tmp_path}",
      f"--output={tmp_path / 'f.npz'}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
    f"error: workdir {tmp_path} has no checkpoints/: train first with python -m alexnet_jax.main "
    f"--workdir={tmp_path}, or pass the workdir of a run"
  )


def test_too_little_free_space_is_one_line_before_any_work(run, data_dir, tmp_path, monkeypatch):
  """Before: the extraction started and, on a full disk, died of a bus error with no message."""
  monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(free=10**6))
  monkeypatch.setattr(features, "readable", lambda *_: pytest.fail("images were decoded"))
  monkeypatch.setattr(features, "predictor", lambda *_: pytest.fail("the net was compiled"))
  restored, output = restore(run, mesh=mesh(1, 1)), str(tmp_path / "out" / "f.npz")
  for extraction, source in ((features.extract_split, "val"), (features.extract_folder, data_dir)):
    with pytest.raises(UserInputError) as e:
      extraction(restored, run, source, output, batch_size=4)
    assert re.fullmatch(
      r"the features of \d+ images need 0\.\d\d GB free beside .*f\.npz \(the file and its rows "
      r"while it is written\) but .* has 0\.00 GB free: free some space or write the file "
      r"elsewhere \(--output\)",
      str(e.value),
    )
  assert not os.path.exists(output) and not os.path.exists(output + ".partial")


class _Interrupted(Exception):
  """A crash (or a kill) between two batches."""


_PREDICTOR = features.predictor


def predictor_that(monkeypatch, at_call: int = 0, action=None) -> list:
  """Extraction's net, counting its batches (the list returned) and calling action() before
  batch `at_call` (1-based)."""
  calls, real = [], _PREDICTOR

  def make(model, k, *args):
    predict = real(model, k, *args)

    def counted(*args):
      calls.append(1)
      if len(calls) == at_call:
        action()
      return predict(*args)

    return counted

  monkeypatch.setattr(features, "predictor", make)
  return calls


def _crash():
  raise _Interrupted


def _sigterm():
  os.kill(os.getpid(), signal.SIGTERM)  # caught: the extraction stops before the next batch


@pytest.mark.parametrize("stop, rows_kept", [(_crash, 4), (_sigterm, 12)])
def test_a_stopped_extraction_resumes_with_the_rows_of_an_uninterrupted_one(
  run, val_features, tmp_path, monkeypatch, stop, rows_kept
):
  """20 images in batches of 4, stopped at the third: the rerun reads only the images not
  written (before: it started from zero) and ends with exactly the uninterrupted rows."""
  restored, output = restore(run, mesh=mesh(1, 1)), str(tmp_path / "val.npz")
  calls = predictor_that(monkeypatch, 3, stop)
  with pytest.raises(_Interrupted if stop is _crash else features.Stopped) as e:
    features.extract_split(restored, run, "val", output, batch_size=4)
  if stop is _sigterm:
    assert str(e.value) == (
      f"SIGTERM received: stopped after 12 of 20 images, kept in {output}.partial; run the "
      "same command again to go on from there"
    )
  assert not os.path.exists(output) and os.path.isdir(output + ".partial")
  calls = predictor_that(monkeypatch)
  report = features.extract_split(restored, run, "val", output, batch_size=4)
  assert len(calls) == (20 - rows_kept) // 4 and report.count == 20
  assert sorted(os.listdir(tmp_path)) == ["val.npz"]  # the partial rows are gone
  f = featurefile.read(output)
  for key in ("fc7", "top5_index", "top5_prob", "path", "label"):
    np.testing.assert_array_equal(f[key], val_features[key], err_msg=key)


def test_a_partial_extraction_of_other_images_is_replaced_not_used(
  run, val_features, tmp_path, monkeypatch
):
  restored, output = restore(run, mesh=mesh(1, 1)), str(tmp_path / "f.npz")
  predictor_that(monkeypatch, 3, _crash)
  with pytest.raises(_Interrupted):
    features.extract_split(restored, run, "val", output, batch_size=4)
  folder, picked = folder_of_three(tmp_path, val_features)
  assert features.extract_folder(restored, run, str(folder), output, 4).count == 3
  assert_features_of(output, picked, val_features)


def test_an_unreadable_image_of_a_split_is_left_out_not_shifted(
  run, val_features, data_dir, tmp_path
):
  """Before: the rows after an unreadable image were written under their neighbours' names."""
  data = shutil.copytree(data_dir, tmp_path / "data", ignore=shutil.ignore_patterns(".built"))
  broken = 5
  with open(str(val_features["path"][broken]).replace(data_dir, str(data)), "wb") as f:
    f.write(b"not a jpeg")
  restored = restore(run, mesh=mesh(1, 1))
  config = restored.config.copy_and_resolve_references()
  config.data_dir = str(data)
  restored = dataclasses.replace(restored, config=config)
  output = str(tmp_path / "val.npz")
  assert features.extract_split(restored, run, "val", output, batch_size=4).count == 19
  f, kept = featurefile.read(output), [i for i in range(20) if i != broken]
  np.testing.assert_array_equal(f["label"], val_features["label"][kept])
  assert [os.path.relpath(p, data) for p in f["path"]] == [
    os.path.relpath(p, data_dir) for p in val_features["path"][kept]
  ]
  assert_close(f["fc7"], val_features["fc7"][kept], rtol=1e-5)


def test_bfloat16_extraction_stays_close_to_float32(run, val_features, tmp_path):
  """`extract --dtype=bfloat16`: the net computes in bfloat16 and the file still holds float32
  fc7, close to float32's by the measures docs/features.md quotes for a trained net."""
  restored = restore(run, mesh=mesh(1, 1), dtype="bfloat16")
  assert restored.config.dtype == "bfloat16" and restored.model.dtype == jnp.bfloat16
  assert restore(run).config.dtype == "float32"  # the run's own dtype is left as it was
  path = str(tmp_path / "val.npz")
  features.extract_split(restored, run, "val", path, batch_size=4)
  f = featurefile.read(path)
  assert f["fc7"].dtype == np.float32 and not np.array_equal(f["fc7"], val_features["fc7"])
  a = dtype_agreement.compare(val_features, f, k=3)
  # Measured here: top-1 and top-5 all equal, cosine >= 0.999996, 96.7% of the 3 nearest; on
  # the quickstart's trained net (docs/features.md) 100% top-1 and cosine >= 0.99994.
  assert a.images == 20 and a.top1 >= 0.95 and a.cosine_min > 0.9999 and a.neighbours >= 0.9, a


def test_a_partial_extraction_in_another_dtype_is_replaced_not_used(
  run, val_features, tmp_path, monkeypatch
):
  output = str(tmp_path / "f.npz")
  predictor_that(monkeypatch, 3, _crash)
  with pytest.raises(_Interrupted):
    features.extract_split(restore(run, mesh=mesh(1, 1), dtype="bfloat16"), run, "val", output, 4)
  calls = predictor_that(monkeypatch)
  features.extract_split(restore(run, mesh=mesh(1, 1)), run, "val", output, batch_size=4)
  assert len(calls) == 5  # all 20 images again, in float32
  np.testing.assert_array_equal(featurefile.read(output)["fc7"], val_features["fc7"])


def test_extraction_compiles_with_the_backends_options(run, monkeypatch):
  """Before, extraction compiled with XLA's defaults: its forward pass at batch 128 ran 1.16x
  (jax 0.12.1) to 1.78x (jax 0.10.2) slower on an AVX2 CPU. A wrong option must show."""
  asked = []
  monkeypatch.setattr(
    backend,
    "compiler_options",
    lambda cpu_set: asked.append(cpu_set) or {"xla_no_such_option": True},
  )
  restored = restore(run, mesh=mesh(1, 1))
  predict = features.predictor(restored.model, 5, "no_ynnpack")
  assert asked == ["no_ynnpack"]  # the run's cpu_compiler_options reach it
  side = restored.config.image_size
  batch = {
    "image": np.zeros((1, side, side, 3), np.uint8),
    "offset": np.zeros((1, 2), np.int32),
    "flip": np.zeros(1, bool),
  }
  with pytest.raises(Exception, match="xla_no_such_option"):
    predict(restored.params, batch, np.zeros((side, side, 3), np.float32))


@pytest.mark.slow  # a process of its own; what bfloat16 changes: the test above
def test_the_cli_extracts_in_the_dtype_asked(run, val_features, tmp_path):
  output = str(tmp_path / "val.npz")
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "alexnet_jax.extract",
      f"--workdir={run}",
      "--split=val",
      f"--output={output}",
      "--batch_size=8",
      "--dtype=bfloat16",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "on a {'data': 8, 'model': 1} mesh in bfloat16" in result.stderr
  f = featurefile.read(output)
  assert not np.array_equal(f["fc7"], val_features["fc7"])
  assert dtype_agreement.compare(val_features, f, k=3).cosine_min > 0.9999
