"""What `prepare` reads: the official ImageNet archives or an image-folder tree, listed and
checked before any shard is written, as jobs (a shard's name and a thunk giving its images)
and a fingerprint of the input, recorded in the info file so that a rerun can tell whether
its input is the one the finished shards came from. ImageNet's labels come from
tensorflow-datasets' own label files.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import os
import tarfile
from typing import Iterable, Iterator, NamedTuple

from alexnet_jax.core.errors import UserInputError

TRAIN_TAR, VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"
VAL_SHARD = 1000


def tfds_label_file(name: str) -> str:
  """A label file shipped inside tensorflow-datasets, found without importing the package."""
  spec = importlib.util.find_spec("tensorflow_datasets")
  if spec is None or not spec.submodule_search_locations:
    raise UserInputError("tensorflow-datasets is not installed: pip install -r requirements.txt")
  return os.path.join(spec.submodule_search_locations[0], "datasets", "imagenet2012", name)


def imagenet_classes() -> list[str]:
  with open(tfds_label_file("labels.txt")) as f:
    return [line.strip() for line in f if line.strip()]


def imagenet_val_labels() -> list[str]:
  """The wnid of ILSVRC2012_val_{i+1:08d}.JPEG at position i."""
  with open(tfds_label_file("validation_labels.txt")) as f:
    return [line.strip() for line in f if line.strip()]


def _tar_images(tar: tarfile.TarFile) -> Iterator[tuple[str, bytes]]:
  for member in tar:
    if member.isfile():
      yield member.name, tar.extractfile(member).read()


class Jobs(NamedTuple):
  """What `prepare` writes from an input: a job is (shard name, a thunk giving its items)."""

  train: list
  val: list
  classes: list[str]
  files: str  # the input's fingerprint: `fingerprint` of its files' names and sizes


def fingerprint(sizes: Iterable[tuple[str, int]]) -> str:
  """sha256 of (name, size) pairs, in any order: the same files give the same fingerprint."""
  digest = hashlib.sha256()
  for name, size in sorted(sizes):
    digest.update(f"{name}\t{size}\n".encode())
  return digest.hexdigest()


def archive_jobs(manual_dir: str) -> Jobs:
  """The jobs of the official archives, their fingerprint the archives' names and sizes."""
  classes = imagenet_classes()
  index = {w: i for i, w in enumerate(classes)}
  train_tar = tarfile.open(os.path.join(manual_dir, TRAIN_TAR))
  members = [m for m in train_tar.getmembers() if m.isfile()]
  bad = [m.name for m in members if os.path.splitext(os.path.basename(m.name))[0] not in index]
  if bad or not members:
    raise UserInputError(
      f"{TRAIN_TAR} does not have the official layout (one <wnid>.tar per class): "
      f"found {bad[:3] or 'no files'}"
    )

  def class_items(member):
    wnid = os.path.splitext(os.path.basename(member.name))[0]
    inner = tarfile.open(fileobj=train_tar.extractfile(member))
    return [(f"{wnid}/{os.path.basename(n)}", d, index[wnid]) for n, d in _tar_images(inner)]

  train = [
    (f"{index[os.path.splitext(os.path.basename(m.name))[0]]:04d}", (lambda m=m: class_items(m)))
    for m in members
  ]
  val_labels = imagenet_val_labels()
  val_tar = tarfile.open(os.path.join(manual_dir, VAL_TAR))
  val_members = sorted((m for m in val_tar.getmembers() if m.isfile()), key=lambda m: m.name)

  position = _val_positions([m.name for m in val_members], len(val_labels))

  def val_items(chunk):
    return [
      (os.path.basename(m.name), val_tar.extractfile(m).read(), index[val_labels[position[m.name]]])
      for m in chunk
    ]

  val = [
    (f"{k // VAL_SHARD:05d}", (lambda c=val_members[k : k + VAL_SHARD]: val_items(c)))
    for k in range(0, len(val_members), VAL_SHARD)
  ]
  archives = [(t, os.path.getsize(os.path.join(manual_dir, t))) for t in (TRAIN_TAR, VAL_TAR)]
  return Jobs(train, val, classes, fingerprint(archives))


def _val_number(name: str) -> int:
  """N of ILSVRC2012_val_N.JPEG."""
  try:
    return int(os.path.splitext(os.path.basename(name))[0].rsplit("_", 1)[1])
  except (IndexError, ValueError):
    raise UserInputError(
      f"{VAL_TAR} does not have the official layout: unexpected file {name}"
    ) from None


def _val_positions(names: list[str], count: int) -> dict[str, int]:
  """Each validation file's position in the official label list: ILSVRC2012_val_N.JPEG is
  image N, 1 to count, each number once. A number out of range or given twice would take
  another image's label (or none), so it is refused, naming the files."""
  numbers = [(name, _val_number(name)) for name in names]
  taken = collections.Counter(k for _, k in numbers)
  problems = {
    "numbers out of range": [n for n, k in numbers if not 1 <= k <= count],
    "numbers given twice": [n for n, k in numbers if taken[k] > 1],
  }
  found = "; ".join(f"{what}: {', '.join(bad[:4])}" for what, bad in problems.items() if bad)
  if found:
    raise UserInputError(
      f"{VAL_TAR} does not have the official layout (ILSVRC2012_val_00000001.JPEG to "
      f"ILSVRC2012_val_{count:08d}.JPEG, each once): {found}; download it again from image-net.org"
    )
  return {name: k - 1 for name, k in numbers}


def folder_jobs(manual_dir: str) -> Jobs:
  """The same jobs for an image-folder tree (the class folders' sorted names are the labels),
  their fingerprint every image's path under manual_dir and size."""
  from alexnet_jax.data import sources  # listing files only: TensorFlow is needed here anyway

  train_split, val_split = sources.read_image_folder(manual_dir)
  classes = list(train_split.classes)

  def items(paths, labels):
    out = []
    for p, label in zip(paths, labels):
      with open(p, "rb") as f:
        out.append((os.path.relpath(p, manual_dir), f.read(), int(label)))
    return out

  train = []
  for label, name in enumerate(classes):
    paths = [p for p, y in zip(train_split.paths, train_split.labels) if y == label]
    train.append((f"{label:04d}", (lambda p=paths, y=label: items(p, [y] * len(p)))))
  val = [
    (
      f"{k // VAL_SHARD:05d}",
      (lambda k=k: items(val_split.paths[k : k + VAL_SHARD], val_split.labels[k : k + VAL_SHARD])),
    )
    for k in range(0, len(val_split), VAL_SHARD)
  ]
  images = train_split.paths + val_split.paths
  files = fingerprint((os.path.relpath(p, manual_dir), os.path.getsize(p)) for p in images)
  return Jobs(train, val, classes, files)
