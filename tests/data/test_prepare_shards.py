"""prepare on a tiny pair of archives in the official layout, then train and evaluate on it."""

import concurrent.futures
import io
import json
import os
import pathlib
import shutil
import tarfile

import jax
import numpy as np
import pytest
from conftest import add, jpeg, params_of

from alexnet_jax.core import storage
from alexnet_jax.core.errors import UserInputError
from alexnet_jax.data import prepare_inputs, prepare_shards, shard_format, sources
from alexnet_jax.data.batches import eval_batches, rescaled_sample, train_batches
from alexnet_jax.data.stats import image_stats, load_stats, read_stats
from alexnet_jax.training import metrics, train
from configs import default

VAL_COUNT = 6


def make_archives(root, corrupt=True):
  """The official layout: a train tar of <wnid>.tar archives, a flat val tar; real wnids."""
  val_wnids = prepare_inputs.imagenet_val_labels()[:VAL_COUNT]
  classes = sorted(set(val_wnids))
  os.makedirs(root, exist_ok=True)
  with tarfile.open(os.path.join(root, prepare_shards.TRAIN_TAR), "w") as outer:
    for k, wnid in enumerate(classes):
      inner_bytes = io.BytesIO()
      with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
        for i in range(3):
          add(inner, f"{wnid}_{i}.JPEG", jpeg(10 * k + i, size=(320 + 10 * i, 260)))
        if k == 0:
          add(
            inner, f"{wnid}_cmyk.JPEG", jpeg(99, mode="CMYK")
          )  # as n02105855_2933.JPEG in the real archive
          add(inner, f"{wnid}_png.JPEG", jpeg(98, fmt="PNG"))  # as n02105855_2933.JPEG's PNG cousin
          if corrupt:
            add(inner, f"{wnid}_broken.JPEG", jpeg(97)[:300])  # truncated
      add(outer, f"{wnid}.tar", inner_bytes.getvalue())
  with tarfile.open(os.path.join(root, prepare_shards.VAL_TAR), "w") as val:
    for i in range(VAL_COUNT):
      add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg(1000 + i, size=(280, 300)))
  return classes


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("imagenet")
  classes = make_archives(str(root / "manual"))
  info = prepare_shards.prepare(str(root / "manual"), str(root / "out"), stats_images=20, workers=2)
  return str(root / "manual"), str(root / "out"), classes, info


def test_prepare_writes_256_shards_labels_and_statistics(prepared):
  _, out, classes, info = prepared
  assert len(info.classes) == 1000 and info.side == 256 and info.format == "jpeg"
  n_train = 3 * len(classes) + 2  # the truncated image is skipped
  assert info.splits["train"].num_images == n_train and info.splits["val"].num_images == VAL_COUNT
  assert len(info.splits["train"].files) == len(classes)
  skipped = open(os.path.join(out, "skipped.txt")).read()
  assert "_broken.JPEG" in skipped and skipped.count("\n") == 1
  train_split, val_split = sources.read_prepared(out)
  stats = load_stats(out, 256, (0, 0, 0))
  assert stats.mean_image.shape == (256, 256, 3) and 0 < stats.mean_image.mean() < 255
  assert stats.eigval[0] >= stats.eigval[1] >= stats.eigval[2] > 0
  np.testing.assert_allclose(stats.eigvec.T @ stats.eigvec, np.eye(3), atol=1e-5)
  # Every stored image is a 256x256 RGB JPEG with its class's label; val labels follow the real
  # list.
  val = next(eval_batches(val_split, batch_size=VAL_COUNT, image_size=256, resize_size=256))
  wnids = prepare_inputs.imagenet_val_labels()[:VAL_COUNT]
  assert [train_split.classes[y] for y in val["label"]] == wnids
  assert val["image"].shape == (VAL_COUNT, 256, 256, 3)


def test_prepare_samples_its_statistics_as_for_a_tfds_dataset(prepared):
  """One computation and one file for every route: prepare's stats.npz reads back as the
  statistics of the sample a TFDS dataset's are computed from (test_tfds_source)."""
  _, out, _, _ = prepared
  saved = read_stats(out)
  expected = image_stats(rescaled_sample(sources.read_prepared(out).train, 256, 20))
  assert saved.num_images == expected.num_images == 20
  for key in ("mean_image", "eigval", "eigvec"):
    np.testing.assert_array_equal(getattr(saved, key), getattr(expected, key))


def test_rerun_skips_finished_shards_and_redoes_missing_ones(prepared):
  manual, out, _, _ = prepared
  shards = sorted(os.path.join(out, "train", f) for f in os.listdir(os.path.join(out, "train")))
  for path in shards:
    os.utime(path, (0, 0))
  os.remove(shards[-1])
  prepare_shards.prepare(manual, out, stats_images=20, workers=2)
  assert all(os.path.getmtime(p) == 0 for p in shards[:-1])
  assert os.path.exists(shards[-1]) and os.path.getmtime(shards[-1]) > 0


@pytest.fixture(scope="module")
def raw_dir(prepared, tmp_path_factory) -> str:
  """The archives prepared with --format=raw: JPEG shards, then their raw arrays."""
  manual, _, _, _ = prepared
  raw = str(tmp_path_factory.mktemp("raw") / "out")
  info = prepare_shards.prepare(manual, raw, stats_images=20, workers=2, fmt="raw")
  assert info.format == "raw"
  return raw


def assert_same_batches(a, b, count):
  for _ in range(count):
    x, y = next(a), next(b)
    assert x.keys() == y.keys()
    for key in x:
      assert x[key].dtype == y[key].dtype, key
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_raw_shards_give_the_batches_of_the_jpeg_shards(prepared, raw_dir):
  """The same crops, flips, colours and labels for the same seed, step and process, and the
  same ten patches: raw shards hold the JPEG shards' pixels, decoded once."""
  _, out, _, _ = prepared
  (jpeg_train, jpeg_val), (raw_train, raw_val) = map(sources.read_prepared, (out, raw_dir))
  assert isinstance(raw_train, sources.RawShards) and len(raw_train) == len(jpeg_train)
  stats = load_stats(out, 256, (0, 0, 0))
  for start_step, process_index in ((0, 0), (3, 1)):
    kw = dict(batch_size=4, image_size=227, resize_size=256, stats=stats, seed=5)
    kw |= dict(start_step=start_step, process_index=process_index, process_count=2)
    assert_same_batches(
      *(train_batches(s, **kw) for s in (jpeg_train, raw_train)), count=5
    )  # past an epoch (2 steps of 8 from 20)
  for crops in (1, 10):
    kw = dict(batch_size=4, image_size=227, resize_size=256, crops=crops)
    assert_same_batches(*(eval_batches(s, **kw) for s in (jpeg_val, raw_val)), count=2)
  for a, b in zip(*(rescaled_sample(s, 256, 7) for s in (jpeg_train, raw_train)), strict=True):
    np.testing.assert_array_equal(a, b)


def test_bad_raw_shards_are_one_line_errors_before_any_work(raw_dir, tmp_path, monkeypatch):
  broken = shutil.copytree(raw_dir, tmp_path / "broken")
  first = sorted(p for p in broken.glob("train/*.npy") if not p.name.endswith(".labels.npy"))[0]
  np.save(first, np.load(first)[:1])  # one image where the info file says 3
  with pytest.raises(UserInputError, match=r"raw shard .* holds \(1, 256, 256, 3\) images"):
    sources.read_prepared(str(broken))
  info = json.loads((broken / shard_format.INFO_FILE).read_text())
  (broken / shard_format.INFO_FILE).write_text(json.dumps(info | {"format": "png"}))
  with pytest.raises(UserInputError, match="names format 'png'"):
    sources.read_prepared(str(broken))
  with pytest.raises(UserInputError, match="--format=png: choose one of jpeg, raw"):
    prepare_shards.prepare(str(tmp_path), str(tmp_path / "out"), fmt="png")
  # Too little disk: stopped before writing anything, nothing left as if complete.
  jpeg_only = shutil.copytree(raw_dir, tmp_path / "jpeg", ignore=shutil.ignore_patterns("*.npy"))
  monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 10**6))
  with pytest.raises(UserInputError, match=r"GiB free; the raw arrays of \d+ images need"):
    prepare_shards.to_raw(str(jpeg_only))
  assert not list(jpeg_only.glob("*/*.npy*"))
  # With the disk back, the JPEG shards alone (no archives) convert to the same arrays.
  monkeypatch.undo()
  prepare_shards.to_raw(str(jpeg_only))
  for path in pathlib.Path(raw_dir).glob("*/*.npy"):
    np.testing.assert_array_equal(np.load(path), np.load(jpeg_only / path.parent.name / path.name))


@pytest.mark.slow
def test_train_and_evaluate_on_prepared_data(prepared, raw_dir, tmp_path):
  _, out, _, _ = prepared
  config = default.get_config()
  config.data_dir, config.image_size, config.batch_size = out, 67, 8
  (
    config.num_train_steps,
    config.eval_every_steps,
    config.checkpoint_every_steps,
    config.log_every_steps,
  ) = 2, 2, 2, 1
  workdir = str(tmp_path / "run")
  ten = train.train_and_evaluate(config, workdir)  # default.py: ten-patch evaluation
  assert 0 <= ten["val/top1_error"] <= 1 and 0 <= ten["val/top5_error"] <= ten["val/top1_error"]
  config.eval_crops = 1
  one = train.evaluate_checkpoint(config, workdir)
  assert set(one) == set(ten) and one["val/loss"] != ten["val/loss"]
  config.eval_crops = 10
  assert train.evaluate_checkpoint(config, workdir, step=2)["val/loss"] == pytest.approx(
    ten["val/loss"], rel=1e-5
  )
  with pytest.raises(UserInputError, match="has no checkpoint at step 7"):
    train.evaluate_checkpoint(config, workdir, step=7)
  # The same run from raw shards: the same metrics and parameters, bit for bit.
  config.data_dir = raw_dir
  train.train_and_evaluate(config, str(tmp_path / "raw"))
  for a, b in zip(
    jax.tree.leaves(params_of(workdir)), jax.tree.leaves(params_of(tmp_path / "raw"))
  ):
    np.testing.assert_array_equal(a, b)
  logged = lambda w: [  # noqa: E731
    {k: v for k, v in r.items() if k != "images_per_sec"}
    for r in metrics.read_metrics(str(w))
    if "train/loss" in r
  ]
  assert logged(workdir) == logged(tmp_path / "raw")


def test_bad_archives_are_named(tmp_path):
  with pytest.raises(UserInputError, match="does not exist"):
    prepare_shards.prepare(str(tmp_path / "nowhere"), str(tmp_path / "out"))
  only_train = tmp_path / "one"
  make_archives(str(only_train))
  os.remove(only_train / prepare_shards.VAL_TAR)
  with pytest.raises(UserInputError, match="ILSVRC2012_img_val.tar is missing"):
    prepare_shards.prepare(str(only_train), str(tmp_path / "out"))
  flat = tmp_path / "flat"
  os.makedirs(flat)
  for name in (prepare_shards.TRAIN_TAR, prepare_shards.VAL_TAR):
    with tarfile.open(flat / name, "w") as tar:
      add(tar, "n01440764_1.JPEG", jpeg(0))
  with pytest.raises(UserInputError, match="official layout"):
    prepare_shards.prepare(str(flat), str(tmp_path / "out"))


@pytest.mark.parametrize(
  "numbers, named",
  [
    ((0, 2, 3), r"numbers out of range: ILSVRC2012_val_00000000\.JPEG"),
    ((1, 90000), r"numbers out of range: ILSVRC2012_val_00090000\.JPEG"),
    ((1, 2, 2, 3), r"numbers given twice: ILSVRC2012_val_00000002\.JPEG, ILSVRC2012_val_00000002"),
  ],
  ids=["zero", "90000", "twice"],
)
def test_validation_numbers_out_of_range_or_twice_are_refused_before_any_work(
  tmp_path, numbers, named
):
  """ILSVRC2012_val_00000000.JPEG would take image 50,000's label, a number given twice two
  images one label, 00090000 none: each is a one-line error naming the files."""
  make_archives(str(tmp_path / "m"), corrupt=False)
  with tarfile.open(tmp_path / "m" / prepare_shards.VAL_TAR, "w") as val:
    for k, number in enumerate(numbers):
      add(val, f"ILSVRC2012_val_{number:08d}.JPEG", jpeg(1000 + k, size=(280, 300)))
  with pytest.raises(UserInputError, match=named) as error:
    prepare_shards.prepare(str(tmp_path / "m"), str(tmp_path / "out"), workers=1)
  assert "\n" not in str(error.value) and "download it again" in str(error.value)
  assert not os.path.exists(tmp_path / "out" / "train")


def test_too_little_disk_is_refused_before_work(tmp_path, monkeypatch):
  make_archives(str(tmp_path / "m"), corrupt=False)
  monkeypatch.setattr(
    prepare_shards.shutil, "disk_usage", lambda path: type("U", (), {"free": 10})()
  )
  with pytest.raises(UserInputError, match="GiB free"):
    prepare_shards.prepare(str(tmp_path / "m"), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out" / "train")


def test_an_image_folder_tree_prepares_the_same_way(tmp_path):
  for split, count in (("train", 3), ("val", 1)):
    for c in ("cat", "dog"):
      os.makedirs(tmp_path / "tree" / split / c)
      for i in range(count):
        (tmp_path / "tree" / split / c / f"{i}.jpg").write_bytes(jpeg(i + len(c)))
  info = prepare_shards.prepare(
    str(tmp_path / "tree"), str(tmp_path / "out"), stats_images=4, workers=1
  )
  assert info.classes == ("cat", "dog") and info.splits["train"].num_images == 6
  assert info.splits["val"].num_images == 2


def make_tree(root, classes=("cat", "dog"), train_count=3) -> str:
  for split, count in (("train", train_count), ("val", 1)):
    for c in classes:
      os.makedirs(os.path.join(root, split, c), exist_ok=True)
      for i in range(count):
        pathlib.Path(root, split, c, f"{i}.jpg").write_bytes(jpeg(i + len(c)))
  return str(root)


def mtimes(data_dir) -> dict[str, float]:
  """Every file of data_dir and when it was last written."""
  return {str(p): p.stat().st_mtime_ns for p in pathlib.Path(data_dir).rglob("*") if p.is_file()}


@pytest.mark.parametrize(
  "change, named",
  [
    (
      lambda tree: make_tree(tree, ("bird",)),
      r"other classes \(new \['bird'\], gone \[\]\); files or file sizes\)",
    ),
    (lambda tree: make_tree(tree, ("dog",), train_count=4), "other files or file sizes"),
    (
      lambda tree: (tree / "train" / "cat" / "0.jpg").write_bytes(jpeg(7)),
      "other files or file sizes",
    ),
    (None, r"other --quality \(90 then, 75 now\)"),
  ],
  ids=["class_added", "image_added", "image_replaced", "quality"],
)
def test_a_rerun_over_another_input_is_refused_and_touches_nothing(tmp_path, change, named):
  """A class folder added would shift the labels of every later class while the finished
  shards and statistics stay: a rerun whose input (classes, files and sizes, quality) is not
  the one the shards came from is a one-line error, and nothing is written."""
  tree, out = make_tree(tmp_path / "tree"), str(tmp_path / "out")
  prepare_shards.prepare(tree, out, stats_images=4, workers=1)
  before = mtimes(out)
  if change:
    change(tmp_path / "tree")
  quality = 90 if change else 75
  with pytest.raises(UserInputError, match=named) as error:
    prepare_shards.prepare(tree, out, stats_images=4, quality=quality, workers=1)
  assert "\n" not in str(error.value) and "fresh --data_dir" in str(error.value)
  assert mtimes(out) == before


def test_an_interrupted_prepare_is_not_read_and_is_finished_from_the_same_input(
  tmp_path, monkeypatch
):
  """The input is recorded before the first shard: a rerun after a stop is checked as well,
  and the readers refuse the unfinished data dir."""
  tree, out = make_tree(tmp_path / "tree"), str(tmp_path / "out")
  write_shard = prepare_shards.write_shard

  def stopped_after_one(path, *args, **kwargs):
    monkeypatch.setattr(prepare_shards, "write_shard", stopped)
    return write_shard(path, *args, **kwargs)

  def stopped(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(prepare_shards, "write_shard", stopped_after_one)
  with pytest.raises(KeyboardInterrupt):
    prepare_shards.prepare(tree, out, stats_images=4, workers=1)
  with pytest.raises(UserInputError, match="has not finished writing"):
    sources.read_prepared(out)
  make_tree(tmp_path / "tree", ("ant",))
  with pytest.raises(UserInputError, match=r"new \['ant'\]"):
    prepare_shards.prepare(tree, out, stats_images=4, workers=1)
  shutil.rmtree(tmp_path / "tree" / "train" / "ant")
  shutil.rmtree(tmp_path / "tree" / "val" / "ant")
  monkeypatch.undo()
  info = prepare_shards.prepare(tree, out, stats_images=4, workers=1)
  assert info.classes == ("cat", "dog") and info.splits["train"].num_images == 6


def test_shards_without_a_record_of_their_input_are_refused(tmp_path):
  tree, out = make_tree(tmp_path / "tree"), str(tmp_path / "out")
  prepare_shards.prepare(tree, out, stats_images=4, workers=1)
  info = json.loads((tmp_path / "out" / shard_format.INFO_FILE).read_text())
  del info["origin"]  # as an older version wrote it
  (tmp_path / "out" / shard_format.INFO_FILE).write_text(json.dumps(info))
  with pytest.raises(UserInputError, match="older version that did not record its input"):
    prepare_shards.prepare(tree, out, stats_images=4, workers=1)
  os.remove(tmp_path / "out" / shard_format.INFO_FILE)
  with pytest.raises(UserInputError, match="holds shards .* but no record of the input"):
    prepare_shards.prepare(tree, out, stats_images=4, workers=1)


def test_processes_read_disjoint_equal_shares_covering_the_split(prepared):
  _, out, _, info = prepared
  train_split, _ = sources.read_prepared(out)
  stats = load_stats(out, 256, (0, 0, 0))
  n = info.splits["train"].num_images
  share = n // 2

  def epoch_images(process_index):
    it = train_batches(
      train_split,
      batch_size=share,
      image_size=256,
      resize_size=256,
      stats=stats,
      seed=4,
      process_index=process_index,
      process_count=2,
    )
    return {hash(img.tobytes()) for img in next(it)["image"]}

  first, second = epoch_images(0), epoch_images(1)
  assert len(first) == len(second) == share and not first & second
  one = train_batches(
    train_split, batch_size=n, image_size=256, resize_size=256, stats=stats, seed=4
  )
  assert first | second <= {hash(img.tobytes()) for img in next(one)["image"]}


def test_statistics_of_no_images_are_refused(tmp_path):
  empty = str(tmp_path / "0000.array_record")
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    prepare_shards.write_shard(empty, [], pool, quality=90)
  with pytest.raises(UserInputError, match="no images to compute the statistics"):
    prepare_shards.compute_stats(sources.Shards((empty,), 0, (), 256), sample=10)


def generations(gcs, url: str) -> dict[str, str]:
  """Every object under url and its generation (a new one for each write)."""
  fs, name = storage.filesystem(url)
  return {k: v["generation"] for k, v in fs.find(name, detail=True).items()}


def test_prepare_into_a_bucket_resumes_and_refuses_another_input(gcs, tmp_path):
  """Into a bucket as locally: the info file first, each shard uploaded whole when written; a
  rerun writes only the shard that is missing, one over another input writes nothing."""
  tree, out, stage = make_tree(tmp_path / "tree"), f"{gcs.bucket()}/out", str(tmp_path / "s")
  info = prepare_shards.prepare(tree, out, stats_images=4, workers=1, stage_dir=stage)
  assert info == shard_format.read_finished_info(out) and info.splits["train"].num_images == 6
  assert [os.path.basename(f) for f in gcs.files(out)] == [
    "dataset_info.json",
    "stats.npz",
    "0000.array_record",
    "0001.array_record",
    "00000.array_record",
  ]
  storage.path(f"{out}/train/0001.array_record").unlink()
  shutil.rmtree(stage)  # another host: nothing on its disk
  before = generations(gcs, out)
  assert prepare_shards.prepare(tree, out, stats_images=4, workers=1, stage_dir=stage) == info
  after = generations(gcs, out)
  rewritten = {os.path.basename(k) for k in after if after[k] != before.get(k)}
  assert rewritten == {"0001.array_record", "dataset_info.json"}  # the info: when finished
  make_tree(tmp_path / "tree", ("bird",))
  with pytest.raises(UserInputError, match=r"new \['bird'\]"):
    prepare_shards.prepare(tree, out, stats_images=4, workers=1, stage_dir=stage)
  assert generations(gcs, out) == after
