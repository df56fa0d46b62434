"""The prepared-shard format: the info file reads back as written, older unmarked files read
as JPEG shards, and the raw arrays are named beside their shard."""

import json

from alexnet_jax.data import shard_format
from alexnet_jax.data.shard_format import Info, SplitShards


def test_the_info_file_reads_back_as_written(tmp_path):
  info = Info(
    "imagenet2012",
    256,
    ("n01440764", "n01443537"),
    {
      "train": SplitShards(
        ("0000.array_record", "0001.array_record"), 5, ("0000.npy", "0001.npy"), (2, 3)
      ),
      "val": SplitShards(("00000.array_record",), 1, ("00000.npy",), (1,)),
    },
    "raw",
  )
  assert shard_format.read_info(str(tmp_path)) is None
  shard_format.write_info(str(tmp_path), info)
  assert shard_format.read_info(str(tmp_path)) == info
  assert info.paths("D", "train", raw=True) == ("D/train/0000.npy", "D/train/0001.npy")
  record = json.loads((tmp_path / shard_format.INFO_FILE).read_text())
  assert record["num_classes"] == 2 and record["splits"]["val"]["raw"]["counts"] == [1]


def test_an_info_file_of_jpeg_shards_before_formats_were_marked_reads_as_jpeg(tmp_path):
  record = {
    "source": "/images",
    "image_side": 256,
    "classes": ["cat"],
    "num_classes": 1,
    "splits": {s: {"files": ["0000.array_record"], "num_images": 1} for s in ("train", "val")},
  }
  (tmp_path / shard_format.INFO_FILE).write_text(json.dumps(record))
  info = shard_format.read_info(str(tmp_path))
  assert info.format == "jpeg" and info.splits["val"] == SplitShards(("0000.array_record",), 1)


def test_raw_arrays_are_named_beside_their_shard():
  raw = shard_format.raw_path("out/train/0007.array_record")
  assert raw == "out/train/0007.npy"
  assert shard_format.raw_labels_path(raw) == "out/train/0007.labels.npy"
