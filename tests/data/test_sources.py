"""Image folders as sources: class folders sorted into labels, every image format read as RGB,
bad layouts named. Prepared shards and TFDS records are tested with what writes them
(test_prepare_shards, test_tfds_source)."""

import os

import numpy as np
import pytest
from conftest import write_image

from alexnet_jax.core.errors import UserInputError
from alexnet_jax.data import batches, sources


def test_classes_sorted_to_labels_and_all_formats_decode(mixed_folder):
  train, val = sources.read_image_folder(mixed_folder)
  assert train.classes == ("a_cat", "b_dog", "c_fox") and len(train) == 8 and train.side is None
  assert val.classes == train.classes and sorted(val.labels.tolist()) == [0, 2, 2]
  assert [train.describe(i) for i in range(len(train))] == list(train.paths)
  batch = next(batches.eval_batches(train, batch_size=8, image_size=24, resize_size=32))
  assert batch["image"].shape == (8, 24, 24, 3) and batch["image"].dtype == np.uint8
  by_label = {int(y): img for y, img in zip(batch["label"], batch["image"])}
  np.testing.assert_allclose(by_label[2], 200, atol=1)  # RGBA -> RGB, alpha dropped
  gray = [
    img for y, img in zip(batch["label"], batch["image"]) if y == 1 and abs(img.mean() - 100) < 2
  ]
  assert gray and np.allclose(gray[0][..., 0], gray[0][..., 2])  # grayscale -> three equal channels


@pytest.mark.parametrize(
  "layout, message",
  [
    (None, "does not exist"),
    ({"train/a/x.jpg": 1}, "no 'val' folder"),
    ({"train/a/x.jpg": 1, "val/b/y.jpg": 1}, r"class folder\(s\) \['b'\] .* not in train"),
    ({"train/a/notes.txt": 0, "val/a/y.jpg": 1}, "no .jpg/.jpeg/.png images"),
    ({"train/x.jpg": 1, "val/y.jpg": 1}, "has no class folders"),
  ],
)
def test_bad_folders_are_named(tmp_path, layout, message):
  root = tmp_path / "d"
  for rel, is_image in (layout or {}).items():
    path = root / rel
    os.makedirs(path.parent, exist_ok=True)
    if is_image:
      write_image(str(path), "RGB", (8, 8), 0)
    else:
      path.write_text("x")
  with pytest.raises(UserInputError, match=message):
    sources.read_image_folder(str(root))
