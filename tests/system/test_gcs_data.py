"""Training from data in a bucket (a real GCS server, the `gcs` fixture): JPEG and raw shards
staged to the local disk train exactly as their local copies do, and `prepare` writes into a
bucket (from an image folder in a bucket) what it writes locally."""

import os
import shutil
import sys
from typing import NamedTuple

import numpy as np
import pytest
import tensorflow as tf
from conftest import main_flags, start

from alexnet_jax.core import files, storage
from alexnet_jax.data import prepare_shards, shard_format, staging
from alexnet_jax.data.stats import read_stats
from alexnet_jax.training import metrics

PREPARED = {"dataset": "prepared", "resize_size": 256}  # prepare's side


class Data(NamedTuple):
  bucket: str  # gs://NAME with images/, jpeg/ and raw/
  jpeg: str  # the local JPEG shards uploaded to jpeg/
  losses: list[dict]  # of 2 steps on the local JPEG shards


@pytest.fixture(scope="module")
def data(gcs, data_dir, tmp_path_factory) -> Data:
  """One bucket for the module: the embedded image folder (images/), its prepared JPEG
  shards (jpeg/) and their raw twins (raw/); and a run on the local JPEG shards."""
  root = tmp_path_factory.mktemp("gcs_data")
  jpeg = str(root / "jpeg")
  prepare_shards.prepare(data_dir, jpeg, stats_images=20, workers=1)
  shutil.copytree(jpeg, root / "raw")
  prepare_shards.to_raw(str(root / "raw"))
  name = gcs.bucket()
  fs, base = storage.filesystem(name)
  for folder, local in (("images", data_dir), ("jpeg", jpeg), ("raw", str(root / "raw"))):
    fs.put(local, f"{base}/{folder}", recursive=True)
  train({str(root / "local"): (jpeg, "")})
  return Data(name, jpeg, losses(str(root / "local")))


def losses(workdir: str) -> list[dict]:
  return [
    {k: v for k, v in r.items() if k != "images_per_sec"}
    for r in metrics.read_metrics(workdir)
    if "train/loss" in r or "val/loss" in r
  ]


def train(runs: dict[str, tuple[str, str]]) -> None:
  """Trains each named run (data_dir, stage_dir) 2 steps, as processes side by side."""
  procs = {
    workdir: start(main_flags(data, workdir, stage_dir=stage, **PREPARED))
    for workdir, (data, stage) in runs.items()
  }
  for workdir, proc in procs.items():
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{workdir}: {err[-3000:]}"


@pytest.mark.slow
def test_jpeg_and_raw_shards_in_a_bucket_train_as_their_local_copy(data, tmp_path):
  stage = str(tmp_path / "stage")
  runs = {
    str(tmp_path / "jpeg"): (f"{data.bucket}/jpeg", stage),
    str(tmp_path / "raw"): (f"{data.bucket}/raw", stage),
  }
  train(runs)
  assert len(data.losses) == 3  # steps 1 and 2, the evaluation at 2
  assert losses(str(tmp_path / "jpeg")) == data.losses
  assert losses(str(tmp_path / "raw")) == data.losses  # raw shards: the same pixels
  # What was read was staged: the raw run's arrays, not its JPEG shards.
  raw = staging.local_dir(f"{data.bucket}/raw", stage)
  info = shard_format.read_info(raw)
  assert info.format == "raw" and os.path.exists(os.path.join(raw, "stats.npz"))
  staged = {f for _, _, names in os.walk(os.path.join(raw, "train")) for f in names}
  assert set(info.splits["train"].raw_files) <= staged
  assert not any(f.endswith(shard_format.RECORD_EXTENSION) for f in staged)


@pytest.mark.slow
def test_prepare_from_a_bucket_into_a_bucket_then_train_from_it(data, tmp_path):
  """The shards prepare writes into a bucket from a bucket's image folder are those it
  writes locally from the same images: training from them gives the same losses."""
  out, stage = f"{data.bucket}/prepared", str(tmp_path / "stage")
  prepare = start(
    [f"--manual_dir={data.bucket}/images", f"--data_dir={out}", f"--stage_dir={stage}"]
    + ["--stats_images=20", "--workers=1"],
    launcher=(sys.executable, "-m", "alexnet_jax.prepare"),
  )
  _, err = prepare.communicate(timeout=600)
  assert prepare.returncode == 0, err[-3000:]
  info = shard_format.read_finished_info(out)
  assert info.source == f"{data.bucket}/images" and info.splits["train"].num_images == 80
  for split in shard_format.SPLITS:
    in_bucket = [os.path.basename(p) for p in shard_format.shards_in(out, split)]
    assert in_bucket == list(info.splits[split].files)
  for name in info.splits["train"].files:  # the local prepare's records
    files.download(f"{out}/train/{name}", str(tmp_path / name))
    remote = shard_format.record_source([str(tmp_path / name)])
    local = shard_format.record_source([os.path.join(data.jpeg, "train", name)])
    parse = tf.train.Example.FromString  # its map's bytes come in any order
    assert [parse(r) for r in remote] == [parse(r) for r in local], name
  here, there = read_stats(data.jpeg), read_stats(out)
  assert np.array_equal(here.mean_image, there.mean_image) and here.num_images == 20
  train({str(tmp_path / "run"): (out, str(tmp_path / "stage2"))})  # staged anew: another host
  assert losses(str(tmp_path / "run")) == data.losses
