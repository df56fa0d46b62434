"""TFDS datasets as sources (`--config.dataset=tfds:NAME`): a dataset tensorflow-datasets
prepared, read by index from its ArrayRecord files, so that step s's batch stays a pure
function of (seed, s) and each process reads its own rows.

Training builds nothing: a dataset not yet prepared is a one-line error giving the build
command (`python -m alexnet_jax.tfds_data`, which calls `build`: TFDS's builder without the
`tfds` command's apache-beam import). TFDS stores originals: they are rescaled as read, and
the statistics are sampled from the training split once and cached beside the run.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

import jax

from alexnet_jax.core import storage
from alexnet_jax.core.errors import UserInputError
from alexnet_jax.data import staging, sync
from alexnet_jax.data.batches import rescaled_sample
from alexnet_jax.data.sources import Records
from alexnet_jax.data.stats import Stats, image_stats, read_stats, write_stats


def _build_command(name: str, builder, data_dir: str) -> str:
  """How to build it, quoted: this module's command, or TFDS's own as ArrayRecord."""
  command = f"`python -m alexnet_jax.tfds_data --dataset={name} --data_dir={data_dir}"
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:  # e.g. imagenet2012: the archives, fetched by hand
    command += " --manual_dir=DIR` (DIR holding the files TFDS's instructions for it name)"
  else:
    command += "`"
  return command + ", or `tfds build` with --file_format=array_record"


def open_builder(name: str, data_dir: str | None):
  """The TFDS builder of a prepared dataset stored as ArrayRecord; one-line errors otherwise."""
  import tensorflow_datasets as tfds

  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except (ValueError, AssertionError, KeyError) as e:  # an unknown name, config or version
    first = str(e).strip().splitlines()[0]
    raise UserInputError(
      f"--config.dataset=tfds:{name}: TFDS has no such dataset ({first}); "
      "`tfds.list_builders()` lists the names"
    ) from None
  root = builder.data_dir_root
  if not builder.is_prepared():
    raise UserInputError(
      f"TFDS dataset {name} is not prepared in {root} (nothing is downloaded here): "
      f"build it with {_build_command(name, builder, root)}, or point --config.data_dir at "
      "the TFDS data directory that holds it"
    )
  formats = {f.value for f in builder.info.available_file_formats()}
  if "array_record" not in formats:
    raise UserInputError(
      f"TFDS dataset {name} in {root} is stored as {', '.join(sorted(formats))}, which cannot "
      "be read by index (exact resume, a share per process): rebuild it with "
      f"{_build_command(name, builder, root)}"
    )
  return builder


def _feature_keys(name: str, builder) -> tuple[str, str]:
  """(image feature, class-label feature): the supervised keys when they are those, else the
  only ones of their kinds."""
  import tensorflow_datasets as tfds

  features = dict(builder.info.features.items())
  kinds = {"image": tfds.features.Image, "label": tfds.features.ClassLabel}
  found = {kind: [k for k, f in features.items() if isinstance(f, t)] for kind, t in kinds.items()}
  supervised = builder.info.supervised_keys or ()
  keys = []
  for kind, candidates in found.items():
    chosen = [k for k in supervised if k in candidates] or candidates
    if not chosen:
      raise UserInputError(
        f"TFDS dataset {name} has no {'class-label' if kind == 'label' else 'image'} feature "
        f"(it has {', '.join(f'{k}: {type(f).__name__}' for k, f in features.items())}): "
        "AlexNet trains on image classification datasets"
      )
    keys.append(chosen[0])
  return keys[0], keys[1]


class TfdsSplits(NamedTuple):
  train: Records
  val: Records
  folder: str  # the dataset's own folder (its version's)


def open_splits(
  name: str, data_dir: str | None, train_split: str, eval_split: str, stage_dir: str = ""
) -> TfdsSplits:
  """The train and eval splits of a prepared TFDS dataset. eval_split "" is 'validation'
  where the dataset has one, else 'test'. A data_dir in a bucket: the dataset's folder is
  staged (`stage`) and read from there; its folder (for the statistics) is the bucket's."""
  import tensorflow_datasets as tfds

  folder = ""
  if data_dir and storage.is_remote(data_dir):
    folder, data_dir = stage(name, data_dir, stage_dir)
  builder = open_builder(name, data_dir)
  image_key, label_key = _feature_keys(name, builder)
  classes = tuple(builder.info.features[label_key].names)
  have = sorted(builder.info.splits)
  if not eval_split:
    eval_split = "validation" if "validation" in have else "test"

  def records(split: str, key: str) -> Records:
    try:
      source = builder.as_data_source(
        split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
      )
    except ValueError as e:  # unknown split or bad slice
      raise UserInputError(
        f"TFDS dataset {name} cannot read split {split!r} ({str(e).splitlines()[0]}): it has "
        f"{', '.join(have)}; set --config.{key}"
      ) from None
    if len(source) == 0:
      raise UserInputError(f"split {split!r} of TFDS dataset {name} is empty; set --config.{key}")
    return Records(source, image_key, label_key, classes, f"{builder.info.full_name}/{split}")

  train = records(train_split, "train_split")
  folder = folder or os.fspath(builder.data_dir)
  return TfdsSplits(train, records(eval_split, "eval_split"), folder)


class Staged(NamedTuple):
  folder: str  # the dataset's folder in the bucket ("" for an unknown dataset)
  data_dir: str  # the local TFDS data dir that holds its copy


def stage(name: str, data_dir: str, stage_dir: str = "") -> Staged:
  """Copies dataset `name`'s own folder (NAME/CONFIG/VERSION) of the bucket `data_dir` to the
  local disk (`staging.stage`): TFDS reads ArrayRecord files, which are read from local files
  only. Returns that folder in the bucket and the local data dir holding its copy.

  The folder's path is the builder's (its version: the one asked for, else the newest this
  TFDS knows), found without reading the bucket."""
  import tensorflow_datasets as tfds

  local = staging.local_dir(data_dir, stage_dir)
  try:
    builder = tfds.builder(name, data_dir=local)
  except (ValueError, AssertionError, KeyError):
    return Staged("", data_dir)  # an unknown name: open_builder's one-line error
  own = os.path.relpath(os.fspath(builder.data_dir), local)
  staging.stage(data_dir, trees=(own,), stage_dir=stage_dir)
  return Staged(storage.join(data_dir, own), local)


def stats_dir(train: Records, data_path: str, workdir: str, resize_size: int, sample: int) -> str:
  """A folder whose statistics (`stats.read_stats`) are those of `sample` training images
  rescaled to resize_size, as `prepare` computes them: beside the data where writable (one
  computation for every run), else in the workdir. Computed on first use by process 0 alone,
  while the others wait for it (`sync.barrier`): processes never write one file at once, and
  all read the same file.

  Raises:
    UserInputError: process 0 did not write them in time, or where the others can read.
  """
  key = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{train.name.split('/')[-1]}_{resize_size}_{sample}")
  folders = [storage.join(data_path, f"alexnet_jax_stats_{key}"), storage.join(workdir, key)]
  if jax.process_index() == 0 and not _with_stats(folders):
    _write_beside_data_or_in_workdir(
      folders, image_stats(rescaled_sample(train, resize_size, sample))
    )
  sync.barrier(f"the statistics of {train.name}")
  found = _with_stats(folders)
  if not found:
    raise UserInputError(
      f"process {jax.process_index()} cannot read the statistics process 0 wrote in "
      f"{' or '.join(folders)}: give every process the same data_dir and workdir, on storage "
      "they share"
    )
  return found


def _with_stats(folders: list[str]) -> str | None:
  """The first of `folders` that holds statistics."""
  return next((folder for folder in folders if read_stats(folder) is not None), None)


def _write_beside_data_or_in_workdir(folders: list[str], stats: Stats) -> None:
  """Writes `stats` into folders[0], or folders[1] where folders[0] cannot be written (a
  read-only data directory or bucket)."""
  try:
    storage.path(folders[0]).mkdir(parents=True, exist_ok=True)
    write_stats(folders[0], stats)
  except OSError:
    storage.path(folders[1]).mkdir(parents=True, exist_ok=True)
    write_stats(folders[1], stats)


def build(name: str, data_dir: str | None, manual_dir: str | None = None) -> str:
  """Builds TFDS dataset `name` as ArrayRecord (downloading what TFDS downloads, reading
  manual_dir where it needs archives fetched by hand); returns its folder."""
  import tensorflow_datasets as tfds

  builder = tfds.builder(name, data_dir=data_dir or None, file_format="array_record")
  config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
  try:
    builder.download_and_prepare(download_config=config)
  except (OSError, AssertionError) as e:  # no network, missing archives
    raise UserInputError(f"building {name} failed: {' '.join(str(e).split())[:500]}") from e
  return os.fspath(builder.data_dir)
