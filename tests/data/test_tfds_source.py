"""TFDS datasets by name: TFDS's own imagenet2012 builder run offline on small archives in the
official layout (a CMYK and a PNG file under the names TFDS fixes, a grayscale image, sizes
that vary), written as ArrayRecord; tfds.testing.mock_data for a dataset never built."""

import os
import shutil
import tarfile

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import add, jpeg, params_of, small_config

from alexnet_jax.core import storage
from alexnet_jax.core.errors import UserInputError
from alexnet_jax.data import datasets, sources, staging, tfds_source
from alexnet_jax.data.batches import eval_batches, train_batches
from alexnet_jax.data.stats import image_stats, load_stats, read_stats, write_stats
from alexnet_jax.training import metrics, train

# Two classes whose archives hold the files TFDS converts by name (CMYK JPEG, PNG), two more.
CLASSES = ("n01739381", "n02105855", "n01440764", "n04596742")
FIXED = {
  "n01739381": ("n01739381_1309.JPEG", "CMYK", "JPEG"),
  "n02105855": ("n02105855_2933.JPEG", "RGB", "PNG"),
}
VAL_COUNT = 8


def make_manual_dir(root: str) -> None:
  """ILSVRC2012_img_train.tar (one tar per class) and ILSVRC2012_img_val.tar, as image-net.org
  serves them; TFDS reads the validation labels from its own list, by file name."""
  os.makedirs(root)
  with tarfile.open(os.path.join(root, "ILSVRC2012_img_train.tar"), "w") as outer:
    for k, wnid in enumerate(CLASSES):
      path = os.path.join(root, f"{wnid}.tar")
      with tarfile.open(path, "w") as inner:
        for i in range(5):
          add(inner, f"{wnid}_{i}.JPEG", jpeg(10 * k + i, size=(90 + 10 * i, 70 + 5 * k)))
        if wnid in FIXED:
          name, mode, fmt = FIXED[wnid]
          add(inner, name, jpeg(99 + k, size=(100, 80), mode=mode, fmt=fmt))
      outer.add(path, f"{wnid}.tar")
      os.remove(path)
  with tarfile.open(os.path.join(root, "ILSVRC2012_img_val.tar"), "w") as val:
    for i in range(VAL_COUNT):
      mode = "L" if i == 0 else "RGB"  # a grayscale JPEG, as ImageNet has
      add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg(1000 + i, size=(80, 95), mode=mode))


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> str:
  """A TFDS data directory holding imagenet2012 (22 train, 8 validation images)."""
  root = tmp_path_factory.mktemp("tfds")
  make_manual_dir(str(root / "manual"))
  tfds_source.build("imagenet2012", str(root / "data"), str(root / "manual"))
  return str(root / "data")


def tfds_config(data_dir: str, **overrides):
  settings = dict(dataset="tfds:imagenet2012", num_classes=1000, batch_size=8, stats_images=50)
  return small_config(data_dir, **(settings | overrides))


def test_imagenet2012_opens_with_its_classes_and_decodes_every_image(tfds_dir):
  opened = tfds_source.open_splits("imagenet2012", tfds_dir, "train", "")
  train_split, val = opened.train, opened.val
  assert (len(train_split), len(val)) == (22, VAL_COUNT)
  assert len(train_split.classes) == 1000 and train_split.classes[0] == "n01440764"
  assert val.name == "imagenet2012/5.1.0/validation" and opened.folder.startswith(tfds_dir)
  assert train_split.side is None and val.describe(3) == "imagenet2012/5.1.0/validation[3]"
  it = eval_batches(train_split, batch_size=32, image_size=67, resize_size=76, crops=1)
  batch = next(it)
  assert it.skipped == 0 and batch["mask"].sum() == 22  # the CMYK and PNG files included
  assert sorted(set(batch["label"][:22])) == sorted(train_split.classes.index(c) for c in CLASSES)
  batch = next(eval_batches(val, batch_size=8, image_size=67, resize_size=76))
  assert batch["mask"].all()  # the grayscale image too


def as_folder(records: sources.Records, root) -> sources.Split:
  """The records' own encoded files as an image folder, in the records' order."""
  import tensorflow as tf

  features = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
  }
  paths, labels = [], []
  for i in range(len(records)):
    example = tf.io.parse_single_example(records.source[i], features)
    paths.append(str(root / f"{i:03d}.jpg"))
    (root / f"{i:03d}.jpg").write_bytes(example["image"].numpy())
    labels.append(int(example["label"]))
  return sources.Split(tuple(paths), np.asarray(labels, np.int32), records.classes)


def test_tfds_records_give_the_batches_of_the_same_images_in_a_folder(tfds_dir, tmp_path):
  """The paper's pipeline unchanged: the same crops, flips, colours and labels for the same
  seed and step, and the same ten patches, as the image-folder path reading the same files;
  each process's share and a resumed stream as there."""
  records = tfds_source.open_splits("imagenet2012", tfds_dir, "train", "").train
  folder = as_folder(records, tmp_path)
  stats = load_stats("", 76, (120.0, 110.0, 100.0))
  args = dict(batch_size=4, image_size=67, resize_size=76, stats=stats, seed=3)
  for start_step, process_index in ((0, 0), (7, 1)):
    kw = args | dict(start_step=start_step, process_index=process_index, process_count=2)
    a = train_batches(records, **kw)
    b = train_batches(folder, **kw)
    for _ in range(6):  # past an epoch (5 global batches of 8 from 22)
      x, y = next(a), next(b)
      assert x.keys() == y.keys()
      for key in x:
        np.testing.assert_array_equal(x[key], y[key], err_msg=key)
  ten = dict(batch_size=8, image_size=67, resize_size=76, crops=10)
  x = next(eval_batches(records, **ten))
  y = next(eval_batches(folder, **ten))
  for key in x:
    np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def independent_stats(records: sources.Records, side: int) -> dict[str, np.ndarray]:
  """The statistics of every training image, computed here without the code under test:
  each record decoded, its shorter side resized to `side` and its central square taken, then
  numpy's mean image and the eigen-decomposition of the covariance of all [0, 1] pixels."""
  import tensorflow as tf

  images = []
  for i in range(len(records)):
    example = tf.io.parse_single_example(
      records.source[i], {"image": tf.io.FixedLenFeature([], tf.string)}
    )
    image = tf.io.decode_image(example["image"], channels=3, expand_animations=False)
    h, w = image.shape[:2]
    new = [max(side, round(h * side / min(h, w))), max(side, round(w * side / min(h, w)))]
    image = tf.image.resize(image, new, method="bilinear", antialias=True).numpy()
    top, left = (new[0] - side) // 2, (new[1] - side) // 2
    images.append(np.clip(np.round(image[top : top + side, left : left + side]), 0, 255))
  stack = np.stack(images).astype(np.float64)
  eigval, eigvec = np.linalg.eigh(np.cov(stack.reshape(-1, 3).T / 255.0, bias=True))
  return {"mean_image": stack.mean(0), "eigval": eigval[::-1], "eigvec": eigvec[:, ::-1]}


def test_statistics_are_sampled_once_and_cached_beside_the_data(tfds_dir, tmp_path, monkeypatch):
  opened = tfds_source.open_splits("imagenet2012", tfds_dir, "train", "")
  records, path = opened.train, opened.folder
  folder = tfds_source.stats_dir(records, path, str(tmp_path / "work"), 76, 50)
  assert folder.startswith(path)
  cached = read_stats(folder)
  assert cached.num_images == 22 and cached.mean_image.shape == (76, 76, 3)
  expected = independent_stats(records, 76)
  np.testing.assert_allclose(cached.mean_image, expected["mean_image"], atol=1e-3)
  np.testing.assert_allclose(cached.eigval, expected["eigval"], rtol=1e-4)
  signs = np.sign(np.sum(cached.eigvec * expected["eigvec"], axis=0))  # an eigenvector's sign
  np.testing.assert_allclose(cached.eigvec * signs, expected["eigvec"], atol=1e-4)

  def recomputed(images):
    raise AssertionError("recomputed")

  monkeypatch.setattr(tfds_source, "image_stats", recomputed)
  assert tfds_source.stats_dir(records, path, str(tmp_path / "other"), 76, 50) == folder


class FakeClient:
  """jax.distributed's client as process 1 sees it: at the barrier process 0 has written the
  statistics (`written`), or never arrives (`arrives=False`)."""

  def __init__(self, written, arrives=True):
    self.barriers, self._written, self._arrives = [], written, arrives

  def wait_at_barrier(self, barrier_id, timeout_in_ms, process_ids=None):
    self.barriers.append((barrier_id, timeout_in_ms))
    if not self._arrives:
      raise jax.errors.JaxRuntimeError("DEADLINE_EXCEEDED: Barrier timed out.\nmore")
    self._written()


def as_process_1(monkeypatch, client) -> None:
  from jax._src import distributed

  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(distributed.global_state, "client", client)

  def computed(images):
    raise AssertionError("process 1 computed the statistics")

  monkeypatch.setattr(tfds_source, "image_stats", computed)


def test_only_process_0_computes_statistics_the_others_wait_and_read_them(
  tfds_dir, tmp_path, monkeypatch
):
  records = tfds_source.open_splits("imagenet2012", tfds_dir, "train", "").train
  data_path, workdir = str(tmp_path / "data"), str(tmp_path / "work")
  stats = image_stats([np.full((76, 76, 3), 7, np.uint8), np.zeros((76, 76, 3), np.uint8)])
  written = os.path.join(data_path, "alexnet_jax_stats_train_76_50")

  def process_0_writes():
    os.makedirs(written)
    write_stats(written, stats)

  client = FakeClient(process_0_writes)
  as_process_1(monkeypatch, client)
  assert tfds_source.stats_dir(records, data_path, workdir, 76, 50) == written
  assert len(client.barriers) == 1 and client.barriers[0][1] > 0  # a barrier with a limit


def test_a_process_0_that_never_arrives_is_a_one_line_error_not_a_hang(
  tfds_dir, tmp_path, monkeypatch
):
  records = tfds_source.open_splits("imagenet2012", tfds_dir, "train", "").train
  as_process_1(monkeypatch, FakeClient(lambda: None, arrives=False))
  with pytest.raises(UserInputError, match=r"process 1 waited \d+ s .* statistics") as error:
    tfds_source.stats_dir(records, str(tmp_path / "data"), str(tmp_path / "work"), 76, 50)
  assert "\n" not in str(error.value)


def test_mock_data_stands_in_for_a_dataset_never_built():
  """tfds.testing.mock_data's random records through the training pipeline: decoded, cropped,
  labelled within the dataset's classes."""
  with tfds.testing.mock_data(num_examples=12):
    builder = tfds.builder("oxford_flowers102")
    source = builder.as_data_source(
      split="train", deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
    )
    classes = tuple(builder.info.features["label"].names)
    records = sources.Records(source, "image", "label", classes, "oxford_flowers102/train")
    stats = load_stats("", 76, (0.0,) * 3)
    batch = next(
      train_batches(records, batch_size=12, image_size=67, resize_size=76, stats=stats, seed=0)
    )
  assert batch["image"].shape == (12, 67, 67, 3) and batch["image"].std() > 0
  assert 0 <= batch["label"].min() and batch["label"].max() < 102 and len(classes) == 102


@pytest.fixture(scope="module")
def unlabelled_dir(tmp_path_factory) -> str:
  """A TFDS dataset with images and no class label (read back without builder code)."""
  root = str(tmp_path_factory.mktemp("unlabelled"))
  tfds.dataset_builders.store_as_tfds_dataset(
    name="images_only",
    version="1.0.0",
    features=tfds.features.FeaturesDict({"image": tfds.features.Image()}),
    split_datasets={"train": [(i, {"image": np.full((8, 8, 3), i, np.uint8)}) for i in range(3)]},
    data_dir=root,
    file_format="array_record",
  )
  return root


@pytest.fixture(scope="module")
def tfrecord_dir(tfds_dir, tmp_path_factory) -> str:
  root = tmp_path_factory.mktemp("tfrecord")
  make_manual_dir(str(root / "manual"))
  builder = tfds.builder("imagenet2012", data_dir=str(root / "data"), file_format="tfrecord")
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(root / "manual"))
  )
  return str(root / "data")


@pytest.mark.parametrize(
  "where, overrides, message",
  [
    ("empty", {"dataset": "tfds:no_such_dataset"}, "TFDS has no such dataset"),
    ("empty", {"dataset": "tfds:imagenet2012:9.9.9"}, "cannot be loaded at version 9.9.9"),
    (
      "empty",
      {"dataset": "tfds:imagenette/320px-v2"},
      r"imagenette/320px-v2 is not prepared in .*`python -m alexnet_jax.tfds_data "
      "--dataset=imagenette/320px-v2 --data_dir=.*`, or `tfds build` with "
      "--file_format=array_record",
    ),
    ("empty", {"dataset": "imagenet2012"}, "--dataset=imagenet2012 --data_dir=.* --manual_dir=DIR"),
    ("built", {"eval_split": "test"}, r"cannot read split 'test' .*train, validation"),
    ("built", {"num_classes": 10}, "TFDS dataset imagenet2012 has 1000 classes"),
    ("tfrecord", {}, r"stored as tfrecord.*rebuild it with `python -m alexnet_jax.tfds_data"),
    ("unlabelled", {"dataset": "tfds:images_only"}, "has no class-label feature"),
  ],
)
def test_bad_tfds_settings_are_one_line_errors_before_any_work(
  where, overrides, message, tmp_path, request, monkeypatch
):
  data_dir = {
    "empty": lambda: str(tmp_path),
    "built": lambda: request.getfixturevalue("tfds_dir"),
    "tfrecord": lambda: request.getfixturevalue("tfrecord_dir"),
    "unlabelled": lambda: request.getfixturevalue("unlabelled_dir"),
  }[where]()
  monkeypatch.setattr(train, "builders", None)  # nothing is built or compiled before the error
  with pytest.raises(UserInputError, match=message) as error:
    train.train_and_evaluate(tfds_config(data_dir, **overrides), str(tmp_path / "run"))
  assert "\n" not in str(error.value)


@pytest.mark.slow
def test_train_evaluate_ten_patches_and_resume_exactly_on_tfds_imagenet2012(tfds_dir, tmp_path):
  """A run stopped after step 2 of 3 and rerun ends with the parameters and metrics of a run
  never stopped; evaluation takes the paper's ten patches over the whole validation split."""
  config = tfds_config(tfds_dir, num_train_steps=3, eval_crops=10, checkpoint_every_steps=2)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  result = train.train_and_evaluate(config, straight)
  assert result["val/skipped_images"] == 0 and 0 <= result["val/top1_error"] <= 1
  config_2 = tfds_config(tfds_dir, num_train_steps=2, eval_crops=10, checkpoint_every_steps=2)
  train.train_and_evaluate(config_2, resumed)
  train.train_and_evaluate(config, resumed)
  for a, b in zip(jax.tree.leaves(params_of(straight)), jax.tree.leaves(params_of(resumed))):
    np.testing.assert_array_equal(a, b)

  def logged(workdir):
    return [
      {k: v for k, v in r.items() if k != "images_per_sec"} for r in metrics.read_metrics(workdir)
    ]

  assert logged(straight) == logged(resumed)
  assert datasets.load_splits(config, resumed).train.name == "imagenet2012/5.1.0/train"
  shutil.rmtree(straight)


def test_a_tfds_dataset_in_a_bucket_is_staged_and_its_statistics_kept_there(
  tfds_dir, gcs, tmp_path
):
  """Only the dataset's own folder is copied; the statistics go beside the data, in the
  bucket, for every host and run."""
  bucket = gcs.bucket()
  fs, base = storage.filesystem(bucket)
  fs.put(tfds_dir, f"{base}/tfds", recursive=True)
  fs.pipe_file(f"{base}/tfds/other/1.0.0/x", b"not read")
  config = tfds_config(f"{bucket}/tfds", stage_dir=str(tmp_path / "stage"), stats_images=5)
  data = datasets.load_splits(config, str(tmp_path / "run"))
  local = tfds_source.open_splits("imagenet2012", tfds_dir, "train", "")
  assert len(data.train) == len(local.train) == 22
  assert data.train.source[3] == local.train.source[3] and data.stats.num_images == 5
  staged = staging.local_dir(f"{bucket}/tfds", str(tmp_path / "stage"))
  assert [f for f in os.listdir(staged) if not f.startswith(".")] == ["imagenet2012"]
  assert any("/imagenet2012/5.1.0/alexnet_jax_stats_" in f for f in gcs.files(bucket))
  assert not os.path.exists(tmp_path / "run")  # nothing in the workdir
