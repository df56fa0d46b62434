"""The prepared-shard format: what `prepare` writes and the readers read, named here alone.

  DATA_DIR/dataset_info.json          `Info`: classes, image side, format, each split's shards,
                                      what they were written from (`Origin`)
  DATA_DIR/<split>/NNNN.array_record  serialized tf.Examples: IMAGE_KEY (a SIDE x SIDE JPEG),
                                      LABEL_KEY, FILE_NAME_KEY (where the image came from)
  DATA_DIR/<split>/NNNN.npy           --format=raw: the shard's images decoded, memory-mappable
  DATA_DIR/<split>/NNNN.labels.npy    (n, SIDE, SIDE, 3) uint8, and their (n,) int32 labels
  DATA_DIR/stats.npz                  the training statistics (`data.stats`)

ArrayRecord gives random access by index: training reads any permutation of a split, splits
it exactly between processes and resumes mid-epoch without replaying data. TensorFlow and
ArrayRecord are imported where used: `prepare`'s encoding processes import this module.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

from alexnet_jax.core import files, storage
from alexnet_jax.core.errors import UserInputError

SIDE = 256  # the paper's down-sampled images
FORMATS = ("jpeg", "raw")
SPLITS = ("train", "val")
INFO_FILE = "dataset_info.json"
RECORD_EXTENSION = ".array_record"
_RAW, _RAW_LABELS = ".npy", ".labels.npy"
IMAGE_KEY, LABEL_KEY, FILE_NAME_KEY = "image", "label", "file_name"


def check_format(fmt: str) -> None:
  if fmt not in FORMATS:
    raise UserInputError(f"--format={fmt}: choose one of {', '.join(FORMATS)}")


def shard_path(data_dir: str, split: str, name: str) -> str:
  return storage.join(data_dir, split, name + RECORD_EXTENSION)


def shards_in(data_dir: str, split: str) -> list[str]:
  """The finished shards of a split, sorted (an interrupted one is still a hidden temporary
  file, `files.temporary_name`); none where the split has no folder yet. In a bucket too."""
  folder = storage.path(data_dir).joinpath(split)
  if not folder.is_dir():
    return []
  return sorted(
    os.fspath(f)
    for f in folder.iterdir()
    if f.name.endswith(RECORD_EXTENSION) and not f.name.startswith(".")
  )


def raw_path(shard: str) -> str:
  """The raw array written beside a JPEG shard."""
  return shard[: -len(RECORD_EXTENSION)] + _RAW


def raw_labels_path(raw: str) -> str:
  return raw[: -len(_RAW)] + _RAW_LABELS


def record_writer(path: str):
  """An ArrayRecord writer of one record per group: each record read alone, by index."""
  from array_record.python import array_record_module

  return array_record_module.ArrayRecordWriter(path, "group_size:1")


def record_source(paths: Sequence[str]):
  """The serialized records of the shards `paths`, in order, by index."""
  from array_record.python.array_record_data_source import ArrayRecordDataSource

  return ArrayRecordDataSource(list(paths))


def num_records(path: str) -> int:
  from array_record.python import array_record_module

  reader = array_record_module.ArrayRecordReader(path)
  n = reader.num_records()
  reader.close()
  return n


def encode_example(jpeg: bytes, label: int, name: str) -> bytes:
  """One record: the JPEG, its class and the name of the file it came from."""
  import tensorflow as tf

  feature = {
    IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[jpeg])),
    LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
    FILE_NAME_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[name.encode()])),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


@dataclasses.dataclass(frozen=True)
class SplitShards:
  """One split's shards, as names in DATA_DIR/<split>/, and their raw arrays once written."""

  files: tuple[str, ...]
  num_images: int
  raw_files: tuple[str, ...] = ()
  raw_counts: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Origin:
  """What the shards were written from, beside the classes: recorded before the first shard
  is written, so that a rerun can tell its input is the same before it keeps any."""

  files: str  # sha256 of the input's file names and sizes (the archives', or every image's)
  quality: int  # the JPEG quality the images were re-encoded at


@dataclasses.dataclass(frozen=True)
class Info:
  """dataset_info.json: what `prepare` wrote, and the format the readers take it in. Written
  first with no splits (`finished` False: shards being written), then again when every
  split is whole."""

  source: str  # "imagenet2012" (the archives) or the image folder's path
  side: int
  classes: tuple[str, ...]
  splits: dict[str, SplitShards]
  format: str = "jpeg"
  origin: Origin | None = None  # None: written by a version that did not record it

  @property
  def finished(self) -> bool:
    return set(self.splits) >= set(SPLITS)

  def paths(self, data_dir: str, split: str, raw: bool = False) -> tuple[str, ...]:
    """The split's JPEG shards (or raw arrays) in data_dir."""
    shards = self.splits[split]
    return tuple(
      os.path.join(data_dir, split, f) for f in (shards.raw_files if raw else shards.files)
    )


def write_info(data_dir: str, info: Info) -> None:
  splits = {}
  for name, shards in info.splits.items():
    splits[name] = {"files": list(shards.files), "num_images": shards.num_images}
    if shards.raw_files:
      splits[name]["raw"] = {"files": list(shards.raw_files), "counts": list(shards.raw_counts)}
  record = {
    "source": info.source,
    "image_side": info.side,
    "classes": list(info.classes),
    "num_classes": len(info.classes),
    "splits": splits,
    "format": info.format,
  }
  if info.origin:
    record["origin"] = dataclasses.asdict(info.origin)
  files.write_text(storage.join(data_dir, INFO_FILE), json.dumps(record, indent=1))


def read_info(data_dir: str) -> Info | None:
  """data_dir's info (local or in a bucket), None where there is none; an error where another
  version wrote it."""
  path = storage.path(data_dir or ".").joinpath(INFO_FILE)
  try:
    record = json.loads(path.read_text())
  except FileNotFoundError:
    return None
  fmt = record.get("format", "jpeg")  # older versions wrote JPEG shards only, unmarked
  if fmt not in FORMATS:
    raise UserInputError(
      f"{path} names format {fmt!r}, which this version does not read ({', '.join(FORMATS)}): "
      "rerun `python -m alexnet_jax.prepare` with this version"
    )
  splits = {}
  for name, split in record["splits"].items():
    raw = split.get("raw", {})
    splits[name] = SplitShards(
      tuple(split["files"]),
      split["num_images"],
      tuple(raw.get("files", ())),
      tuple(raw.get("counts", ())),
    )
  origin = Origin(**record["origin"]) if "origin" in record else None
  classes = tuple(record["classes"])
  return Info(record["source"], record["image_side"], classes, splits, fmt, origin)


def read_finished_info(data_dir: str) -> Info | None:
  """data_dir's info as `read_info`, and an error where `prepare` has not finished there."""
  info = read_info(data_dir)
  if info is not None and not info.finished:
    raise UserInputError(
      f"`python -m alexnet_jax.prepare` has not finished writing {data_dir}: rerun it with the "
      "same --manual_dir and --data_dir to finish"
    )
  return info
