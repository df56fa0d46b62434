"""The embedded dataset: layout, determinism, and no half-written copy taken for complete."""

import filecmp
import os

from alexnet_jax.data import sources, synthetic


def test_layout_and_determinism(tmp_path):
  a = synthetic.generate(str(tmp_path / "a"), train_per_class=2, val_per_class=1, seed=5)
  b = synthetic.generate(str(tmp_path / "b"), train_per_class=2, val_per_class=1, seed=5)
  train, val = sources.read_image_folder(a)
  assert train.classes == synthetic.CLASSES and len(synthetic.CLASSES) == 10
  assert len(train) == 20 and len(val) == 10 and all(p.endswith(".jpg") for p in train.paths)
  for p in train.paths + val.paths:
    assert filecmp.cmp(p, p.replace(a, b), shallow=False)
  other = synthetic.generate(str(tmp_path / "c"), train_per_class=2, val_per_class=1, seed=6)
  assert not filecmp.cmp(train.paths[0], train.paths[0].replace(a, other), shallow=False)


def test_generation_is_skipped_when_complete_and_redone_when_not(tmp_path):
  root = str(tmp_path / "d")
  synthetic.generate(root, train_per_class=1, val_per_class=1)
  first = os.path.join(root, "train", synthetic.CLASSES[0], f"{synthetic.CLASSES[0]}_00000.jpg")
  os.utime(first, (0, 0))
  synthetic.generate(root, train_per_class=1, val_per_class=1)
  assert os.path.getmtime(first) == 0  # complete: untouched
  os.remove(os.path.join(root, ".complete"))  # as if interrupted
  synthetic.generate(root, train_per_class=1, val_per_class=1)
  assert os.path.getmtime(first) > 0


def test_regenerating_smaller_leaves_exactly_the_requested_dataset(tmp_path):
  root = str(tmp_path / "d")
  synthetic.generate(root, train_per_class=3, val_per_class=2)
  synthetic.generate(root, train_per_class=1, val_per_class=1)
  train, val = sources.read_image_folder(root)
  assert len(train) == 10 and len(val) == 10


def test_the_training_seed_does_not_change_the_images(tmp_path):
  """The runs of an experiments suite (seeds 0, 1, ...) share one generated dataset."""
  from conftest import small_config

  from alexnet_jax.data import datasets

  root = str(tmp_path / "data")
  datasets.load_splits(small_config(root, seed=0), str(tmp_path / "w0"))
  first = os.path.join(root, "train", synthetic.CLASSES[0], f"{synthetic.CLASSES[0]}_00000.jpg")
  os.utime(first, (0, 0))
  datasets.load_splits(small_config(root, seed=1), str(tmp_path / "w1"))
  assert os.path.getmtime(first) == 0  # the same images, not generated again
  datasets.load_splits(small_config(root, synthetic_seed=1), str(tmp_path / "w2"))
  assert os.path.getmtime(first) > 0  # other images
