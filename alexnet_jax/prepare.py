"""Builds the paper's down-sampled dataset: 256x256 JPEG shards plus training-set statistics.

  python -m alexnet_jax.prepare --manual_dir=DIR --data_dir=OUT

DIR holds the two official archives (ILSVRC2012_img_train.tar, an archive of per-class
archives, and ILSVRC2012_img_val.tar), or an image-folder tree DIR/train/<class>/*,
DIR/val/<class>/*. One pass over the input: every image is decoded once, its shorter side
rescaled to 256 and its central 256x256 square re-encoded as JPEG into ArrayRecord
shards (one per training class, 1000 images per validation shard). ArrayRecord gives
random access by index, so training reads any permutation of the split, splits it
exactly between processes and resumes mid-epoch without replaying data; a 256x256 JPEG
is ~8x smaller than raw pixels and decodes (with the fused crop) in a fraction of the
time of a full-size image. Shards are written under a temporary name and renamed when
complete, so an interrupted run restarts where it stopped. ImageNet's labels come from
tensorflow-datasets' own label files. Unreadable images are skipped, named and counted.

  python -m alexnet_jax.prepare --manual_dir=DIR --data_dir=OUT --format=raw
  python -m alexnet_jax.prepare --data_dir=OUT --format=raw     # JPEG shards already in OUT

--format=raw also writes every image decoded, uint8 256x256x3, as one memory-mappable .npy
array per shard (8x the disk: about 252 GB for ImageNet against 30 GB of JPEG): training
then decodes nothing, and one core feeds several times the images/s. The raw arrays are
decoded from the JPEG shards (the same pixels, so the same training), which is also how
existing JPEG shards are converted without the archives.

Either folder may be a bucket: --data_dir=gs://BUCKET/OUT writes each file on the local disk
(--stage_dir) and uploads it whole when finished; --manual_dir=gs://... is copied to the
local disk first (it is read by seeking and by name).
"""

from __future__ import annotations

from absl import flags

from alexnet_jax.core import cli
from alexnet_jax.core.errors import UserInputError
from alexnet_jax.data import prepare_shards, shard_format


def define_flags() -> None:
  flags.DEFINE_string(
    "manual_dir", None, "The two ImageNet archives, or train/ and val/ class folders."
  )
  flags.DEFINE_string("data_dir", None, "Where the shards go (then --config.data_dir=THIS).")
  flags.DEFINE_integer(
    "stats_images", 10_000, "Training images sampled for the mean image and colour PCA."
  )
  flags.DEFINE_integer("quality", 90, "JPEG quality of the re-encoded 256x256 images.")
  flags.DEFINE_integer("workers", None, "Encoding processes (default: one per CPU).")
  flags.DEFINE_string(
    "format", "jpeg", "jpeg: 256x256 JPEG shards; raw: also their decoded pixels (8x the disk)."
  )
  flags.DEFINE_string(
    "stage_dir", "", "Local copies of gs:// folders (default: ~/.cache/alexnet_jax/staged)."
  )


def main() -> None:
  f = flags.FLAGS
  shard_format.check_format(f.format)
  if f.data_dir and not f.manual_dir and f.format == "raw":
    prepare_shards.to_raw(f.data_dir, f.stage_dir)  # the JPEG shards already there
  elif not f.manual_dir or not f.data_dir:
    raise UserInputError("pass --manual_dir=DIR (the archives or class folders) and --data_dir=OUT")
  else:
    prepare_shards.prepare(
      f.manual_dir, f.data_dir, f.stats_images, f.quality, f.workers, f.format, f.stage_dir
    )


if __name__ == "__main__":
  cli.run(main, define_flags)
