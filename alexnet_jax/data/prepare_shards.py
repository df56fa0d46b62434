"""Prepared shards from the ImageNet archives or an image-folder tree (the work of
`python -m alexnet_jax.prepare`), and their raw twins.

One pass over the input decodes each image once, rescales its shorter side to 256 and writes
its central square as JPEG into ArrayRecord shards (shard_format owns their names, records
and info file): random access by index is what lets training permute, split between
processes and resume mid-epoch without replaying data. Shards are written under a temporary
name and renamed when whole, so a stopped run restarts where it stopped. `to_raw` decodes the
JPEG shards into memory-mappable uint8 arrays (8x the disk, nothing to decode in training),
the same pixels, so the same training. The statistics are sampled as for any source
(stats.py). What is read from the input, and how it is checked, is `prepare_inputs`.

A bucket (gs://) as data_dir: every file is written on the local disk first (`Output`: the
folder training on this host would stage the bucket to), and each finished shard or array is
uploaded whole (an object appears whole or not at all, as a rename makes a local file
appear); the info file goes to the bucket before the first shard, and a shard already in the
bucket is not written again. A bucket as manual_dir is staged to the local disk first.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import multiprocessing
import os
import shutil
import tarfile
import time
from typing import TYPE_CHECKING, Iterable, NamedTuple

import numpy as np
from absl import logging
from PIL import Image

from alexnet_jax.core import files as files_lib
from alexnet_jax.core import locks, storage
from alexnet_jax.core.errors import UserInputError
from alexnet_jax.data import image_files, prepare_inputs, shard_format, staging
from alexnet_jax.data.prepare_inputs import TRAIN_TAR, VAL_TAR
from alexnet_jax.data.shard_format import SIDE, SPLITS
from alexnet_jax.data.stats import Stats, image_stats, read_stats, write_stats

RAW_IMAGE_BYTES = SIDE * SIDE * 3
AVERAGE_JPEG_BYTES = 110_000  # ImageNet's training JPEGs: 147 GB / 1.28M, to size raw shards

if TYPE_CHECKING:  # imported where used: the encoding processes import this module, not TensorFlow
  from alexnet_jax.data.sources import Shards


def downsample(data: bytes, side: int = SIDE, quality: int = 90) -> bytes:
  """Shorter side to `side`, central square, re-encoded as RGB JPEG. Raises on a bad image.

  PIL reads what the real archive holds: CMYK and grayscale JPEGs, PNGs named .JPEG.
  """
  image = Image.open(io.BytesIO(data))
  if image.width * image.height > image_files.MAX_PIXELS:  # PIL only warns up to twice that
    raise ValueError(
      f"{image.width}x{image.height} pixels, over the limit of {image_files.MAX_PIXELS}"
    )
  image.draft("RGB", (side, side))  # JPEG: let libjpeg decode at the smallest scale >= side
  image = image.convert("RGB")
  w, h = image.size
  scale = side / min(w, h)
  nw, nh = max(side, round(w * scale)), max(side, round(h * scale))
  image = image.resize((nw, nh), Image.BICUBIC)
  left, top = (nw - side) // 2, (nh - side) // 2
  out = io.BytesIO()
  image.crop((left, top, left + side, top + side)).save(out, "JPEG", quality=quality)
  return out.getvalue()


def _encode(item: tuple[str, bytes, int], quality: int) -> tuple[str, bytes | None, int, str]:
  name, data, label = item
  try:
    return name, downsample(data, quality=quality), label, ""
  except Exception as e:  # anything PIL cannot read is skipped and reported, never a zero image
    return name, None, label, f"{type(e).__name__}: {e}"


class Written(NamedTuple):
  count: int  # images written
  skipped: list[str]  # "NAME: why", one per image that could not be read


def write_shard(path: str, items: Iterable[tuple[str, bytes, int]], pool, quality: int) -> Written:
  """Encodes items in the pool and writes them to `path` atomically (`files.atomic_path`: a
  temporary name no other process or host shares, synced before the rename)."""
  written, skipped = 0, []
  with files_lib.atomic_path(path) as tmp:
    writer = shard_format.record_writer(tmp)
    for name, jpeg, label, error in pool.map(
      functools.partial(_encode, quality=quality), items, chunksize=8
    ):
      if jpeg is None:
        skipped.append(f"{name}: {error}")
        logging.warning("skipped unreadable image %s (%s)", name, error)
        continue
      writer.write(shard_format.encode_example(jpeg, label, name))
      written += 1
    writer.close()
  return Written(written, skipped)


def _input_images(manual_dir: str, archives: bool) -> int:
  """How many images the input holds: counted in a folder tree, estimated for archives."""
  if archives:
    return _input_bytes(manual_dir, archives) // AVERAGE_JPEG_BYTES
  return sum(image_files.is_image(f) for _, _, fs in os.walk(manual_dir) for f in fs)


class Output(NamedTuple):
  """Where prepare's files go (data_dir: a folder or a bucket) and where they are written
  (`local`: data_dir itself, or for a bucket its local copy, `staging.local_dir`)."""

  data_dir: str
  local: str
  stage_dir: str

  @classmethod
  def of(cls, data_dir: str, stage_dir: str) -> Output:
    remote = storage.is_remote(data_dir)
    local = staging.local_dir(data_dir, stage_dir) if remote else data_dir
    return cls(data_dir, local, stage_dir)

  @property
  def remote(self) -> bool:
    return self.local != self.data_dir

  def publish(self, path: str) -> None:
    """Uploads the finished local file `path` to the bucket, whole; locally it is in place."""
    if self.remote:
      staging.publish(self.local, self.data_dir, os.path.relpath(path, self.local))

  def fetch(self, names: list[str]) -> None:
    """Copies the bucket's files `names` to `local`, where not there already."""
    if self.remote and names:
      staging.stage(self.data_dir, names, stage_dir=self.stage_dir)

  def check_disk(self, need: int, what: str) -> None:
    free = shutil.disk_usage(self.local).free
    logging.info("%s need about %.1f GiB; %.1f GiB free", what, need / 2**30, free / 2**30)
    if free < need:
      other = "--stage_dir (where a bucket's files are written first)" if self.remote else ""
      raise UserInputError(
        f"{self.local} has {free / 2**30:.1f} GiB free; {what} need about "
        f"{need / 2**30:.1f} GiB: free some space or choose another {other or '--data_dir'}"
      )


def _local_input(manual_dir: str, stage_dir: str) -> str:
  """manual_dir where it can be read: a bucket's archives, or its train/ and val/ trees,
  staged to the local disk (tarfile seeks, and each image is opened by name)."""
  if not storage.is_remote(manual_dir):
    return manual_dir
  archives = [t for t in (TRAIN_TAR, VAL_TAR) if storage.path(manual_dir).joinpath(t).exists()]
  trees = () if archives else ("train", "val")
  return staging.stage(manual_dir, archives, trees, stage_dir).local


def _input_bytes(manual_dir: str, archives: bool) -> int:
  if archives:
    return sum(os.path.getsize(os.path.join(manual_dir, t)) for t in (TRAIN_TAR, VAL_TAR))
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(manual_dir) for f in fs)


# Two prepares on one data dir would write the same shards and stats: the second is refused.
_owning_data_dir = locks.hold(
  "data_dir", "data dir", "wait for that prepare, or use another --data_dir"
)


def _check_same_input(data_dir: str, planned: shard_format.Info) -> None:
  """Refuses a rerun whose input is not the one data_dir's shards were written from: keeping
  them would mix two inputs (a class folder added shifts every later label) and keep the old
  statistics. Shards with no record of their input are refused too."""
  recorded = shard_format.read_info(data_dir)
  fresh = "prepare into a fresh --data_dir (or delete this one)"
  if recorded is None:
    written = [p for s in shard_format.SPLITS for p in shard_format.shards_in(data_dir, s)]
    if written:
      raise UserInputError(
        f"{data_dir} holds shards ({written[0]}, ...) but no record of the input they came "
        f"from ({shard_format.INFO_FILE} missing): {fresh}"
      )
    return
  if recorded.origin is None:
    raise UserInputError(
      f"{data_dir} was prepared by an older version that did not record its input, so this "
      f"rerun cannot tell whether it is the same: {fresh}"
    )
  then, now = recorded.origin, planned.origin
  added = sorted(set(planned.classes) - set(recorded.classes))[:3]
  removed = sorted(set(recorded.classes) - set(planned.classes))[:3]
  differ = [
    what
    for what, same in (
      (f"classes (new {added}, gone {removed})", recorded.classes == planned.classes),
      ("files or file sizes", then.files == now.files),
      (f"--quality ({then.quality} then, {now.quality} now)", then.quality == now.quality),
    )
    if not same
  ]
  if differ:
    raise UserInputError(
      f"{data_dir} holds shards prepared from another input than {planned.source} is now "
      f"(other {'; '.join(differ)}): {fresh}"
    )


def compute_stats(train: Shards, sample: int) -> Stats:
  """The statistics of `sample` images spread evenly over the training shards, sampled as
  for a TFDS dataset (`batches.rescaled_sample`)."""
  from alexnet_jax.data.batches import rescaled_sample

  if len(train) == 0 or sample < 1:
    raise UserInputError(
      f"no images to compute the statistics from ({len(train)} in {train.files[:3]}, "
      f"sample={sample}): every training image was unreadable (listed in skipped.txt); "
      "replace them and rerun"
    )
  return image_stats(rescaled_sample(train, train.side, sample))


@_owning_data_dir
def prepare(
  manual_dir: str,
  data_dir: str,
  stats_images: int = 10_000,
  quality: int = 90,
  workers: int | None = None,
  fmt: str = "jpeg",
  stage_dir: str = "",
) -> shard_format.Info:
  """Writes data_dir/{train,val}/*.array_record, dataset_info.json, stats.npz (and with
  fmt="raw" the raw arrays, `to_raw`); returns the info. The input (classes, files and sizes,
  quality) is recorded in the info file before the first shard; a rerun keeps finished shards
  only where its input is the one recorded, and is a one-line error otherwise. Either folder
  may be a bucket (gs://): stage_dir is then where its files are on the local disk."""
  shard_format.check_format(fmt)
  source = storage.absolute(manual_dir)
  if not storage.path(manual_dir).is_dir():
    raise UserInputError(
      f"manual_dir {manual_dir!r} does not exist: download {TRAIN_TAR} and {VAL_TAR} "
      "from image-net.org into it, or point it at a folder with train/ and val/ class folders"
    )
  manual_dir = _local_input(manual_dir, stage_dir)
  have = [t for t in (TRAIN_TAR, VAL_TAR) if os.path.exists(os.path.join(manual_dir, t))]
  archives = bool(have)
  if archives and len(have) < 2:
    missing = ({TRAIN_TAR, VAL_TAR} - set(have)).pop()
    raise UserInputError(
      f"{os.path.join(manual_dir, missing)} is missing: download it from image-net.org"
    )
  if not archives and not os.path.isdir(os.path.join(manual_dir, "train")):
    raise UserInputError(
      f"{manual_dir} holds neither {TRAIN_TAR} + {VAL_TAR} nor train/ and val/ class folders"
    )
  output = Output.of(data_dir, stage_dir)
  os.makedirs(output.local, exist_ok=True)
  need, what = _input_bytes(manual_dir, archives) // 3, "the JPEG shards"
  if fmt == "raw":
    raw = _input_images(manual_dir, archives) * RAW_IMAGE_BYTES
    need, what = need + raw, f"the JPEG shards and the raw arrays ({raw / 2**30:.1f} GiB)"
  output.check_disk(need, what)
  try:
    planned = (prepare_inputs.archive_jobs if archives else prepare_inputs.folder_jobs)(manual_dir)
  except tarfile.TarError as e:
    raise UserInputError(f"cannot read the archives in {manual_dir}: {e}") from None
  source = "imagenet2012" if archives else source
  started = shard_format.Info(
    source, SIDE, tuple(planned.classes), {}, origin=shard_format.Origin(planned.files, quality)
  )
  _check_same_input(data_dir, started)
  if shard_format.read_info(data_dir) is None:
    shard_format.write_info(data_dir, started)  # before the first shard: what it comes from
  skipped = os.path.join(output.local, "skipped.txt")
  if output.remote:  # the bucket's list, appended to below and uploaded whole; or none
    if storage.path(data_dir).joinpath("skipped.txt").exists():
      output.fetch(["skipped.txt"])
    elif os.path.exists(skipped):
      os.remove(skipped)

  jobs = [("train", n, f) for n, f in planned.train] + [("val", n, f) for n, f in planned.val]
  start = time.time()
  spawn = multiprocessing.get_context("spawn")  # fork is unsafe once JAX or TF threads exist
  with concurrent.futures.ProcessPoolExecutor(workers or os.cpu_count(), mp_context=spawn) as pool:
    for k, (split, name, items) in enumerate(jobs):
      if storage.path(shard_format.shard_path(data_dir, split, name)).exists():
        continue  # finished by an earlier run
      path = shard_format.shard_path(output.local, split, name)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      written, bad = write_shard(path, items(), pool, quality)
      output.publish(path)
      with open(skipped, "a") as f:
        f.writelines(line + "\n" for line in bad)
      if bad:
        output.publish(skipped)
      eta = (time.time() - start) / (k + 1) * (len(jobs) - k - 1)
      logging.info(
        "%s shard %s: %d images, %d skipped (%d/%d shards, ETA %.0f s)",
        split,
        name,
        written,
        len(bad),
        k + 1,
        len(jobs),
        eta,
      )

  from alexnet_jax.data.sources import Shards

  # The shards of the jobs, all written now (a listing would also find older, other ones).
  names = {s: [n + shard_format.RECORD_EXTENSION for j, n, _ in jobs if j == s] for s in SPLITS}
  output.fetch([f"{s}/{name}" for s in SPLITS for name in names[s]])  # written by earlier runs
  shards = {s: [os.path.join(output.local, s, name) for name in names[s]] for s in SPLITS}
  info = dataclasses.replace(
    started,
    splits={
      s: shard_format.SplitShards(
        tuple(os.path.basename(p) for p in paths), sum(shard_format.num_records(p) for p in paths)
      )
      for s, paths in shards.items()
    },
  )
  shard_format.write_info(data_dir, info)
  if read_stats(data_dir) is None and stats_images > 0:
    train = Shards(tuple(shards["train"]), info.splits["train"].num_images, info.classes, SIDE)
    write_stats(data_dir, compute_stats(train, stats_images))
  logging.info(
    "prepared %s: %d train, %d val images",
    data_dir,
    info.splits["train"].num_images,
    info.splits["val"].num_images,
  )
  return to_raw(data_dir, stage_dir) if fmt == "raw" else info


@_owning_data_dir
def to_raw(data_dir: str, stage_dir: str = "") -> shard_format.Info:
  """Writes beside each JPEG shard of data_dir its images decoded and their labels (the raw
  arrays of `shard_format`), then marks the info file raw; returns it. Each array is written
  under a temporary name and renamed when complete (in a bucket: uploaded whole), the info
  file last: an interrupted conversion reruns without redoing finished shards."""
  import tensorflow as tf

  from alexnet_jax.data.batches import numpy_iterator
  from alexnet_jax.data.sources import Shards

  info = shard_format.read_finished_info(data_dir)
  if info is None:
    raise UserInputError(
      f"no JPEG shards to convert in {data_dir} ({shard_format.INFO_FILE} missing): "
      "pass --manual_dir too"
    )
  names = [f"{split}/{name}" for split in SPLITS for name in info.splits[split].files]
  missing = [n for n in names if not storage.path(data_dir).joinpath(n).exists()]
  if missing:
    raise UserInputError(
      f"JPEG shards listed in {storage.join(data_dir, shard_format.INFO_FILE)} are missing: "
      f"{missing[:3]}"
    )
  output = Output.of(data_dir, stage_dir)
  output.fetch(names)  # a bucket's, read here
  todo = [
    (name.split("/")[0], os.path.join(output.local, name))
    for name in names
    if not storage.path(data_dir).joinpath(shard_format.raw_path(name)).exists()
  ]
  todo = [(s, p, shard_format.num_records(p)) for s, p in todo]
  total = sum(n for _, _, n in todo)
  output.check_disk(total * RAW_IMAGE_BYTES, f"the raw arrays of {total} images")
  side = info.side
  for split, jpeg_path, n in todo:
    whole = Shards((jpeg_path,), n, info.classes, side).reader().decoded
    decoded = tf.data.Dataset.range(n).map(whole, num_parallel_calls=-1, deterministic=True)
    raw_path = shard_format.raw_path(jpeg_path)
    with files_lib.atomic_path(raw_path) as tmp_images:  # renamed last: the shard is done
      images = np.lib.format.open_memmap(tmp_images, "w+", np.uint8, (n, side, side, 3))
      labels = np.empty(n, np.int32)
      done = 0
      for image, label in numpy_iterator(decoded.batch(256)):
        images[done : done + len(image)], labels[done : done + len(image)] = image, label
        done += len(image)
      images.flush()
      del images
      with files_lib.atomic_path(shard_format.raw_labels_path(raw_path)) as tmp_labels:
        np.save(tmp_labels, labels)
    output.publish(shard_format.raw_labels_path(raw_path))  # the array last, as locally
    output.publish(raw_path)
    logging.info("raw %s shard %s: %d images", split, os.path.basename(raw_path), n)
  splits = {
    split: dataclasses.replace(
      shards,
      raw_files=tuple(shard_format.raw_path(name) for name in shards.files),
      raw_counts=tuple(shard_format.num_records(p) for p in info.paths(output.local, split)),
    )
    for split, shards in info.splits.items()
  }
  info = dataclasses.replace(info, splits=splits, format="raw")
  shard_format.write_info(data_dir, info)
  return info
