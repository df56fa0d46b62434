"""The data a config names: its train and val splits and the statistics of its images.

Imports TensorFlow (through the sources): the model path never imports this module.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import ml_collections

from alexnet_jax.core import storage
from alexnet_jax.core.errors import UserInputError
from alexnet_jax.data import sources, staging, sync, synthetic, tfds_source
from alexnet_jax.data.dataset_names import tfds_name
from alexnet_jax.data.sources import Source
from alexnet_jax.data.stats import Stats, load_stats


class Data(NamedTuple):
  """A config's data: what training reads and what it subtracts and jitters colour with."""

  train: Source
  val: Source
  stats: Stats


def load_splits(config: ml_collections.ConfigDict, workdir: str) -> Data:
  """The train and val splits the config names, and the statistics of its training images.

  "prepared" reads shards written by `alexnet_jax.prepare` (from the ImageNet archives or
  any image-folder tree); "tfds:NAME" a dataset TFDS built (`tfds_data`); the synthetic set
  is generated on first use, by the first process, under data_dir or workdir/data. Data in
  a bucket (gs://) is read from a local copy, staged once per host (`staging`).

  Args:
    config: the run's config: dataset, data_dir, the split names, num_classes, resize_size,
      the statistics settings (stats_images, channel_mean, mean_subtraction) and, for the
      synthetic set, its sizes and seed.
    workdir: the run's folder; the synthetic set goes under it when data_dir is empty, and a
      TFDS dataset's statistics when its own folder is read-only.

  config.stage_dir is where data in a bucket is copied ("" = ~/.cache/alexnet_jax/staged).

  Returns:
    The splits and the statistics: data_dir's stats.npz for prepared data, those of a
    sample of the training split for TFDS, else config.channel_mean as the mean image and
    ImageNet's colour PCA.

  Raises:
    UserInputError: the data is missing, or does not match num_classes or resize_size.
  """
  data_dir, stage_dir = config.data_dir, config.get("stage_dir", "")
  stats_dir = data_dir if config.dataset == "prepared" else ""
  name = tfds_name(config.dataset)
  if config.dataset == "synthetic":
    data_dir = _synthetic(data_dir or storage.join(workdir, "data"), config, stage_dir)
  if name:
    tfds = tfds_source.open_splits(name, data_dir, config.train_split, config.eval_split, stage_dir)
    train, val = tfds.train, tfds.val
    data_dir = f"TFDS dataset {name}"  # for the message below
  elif config.dataset == "prepared":
    stats_dir = staging.prepared(data_dir, stage_dir)  # a bucket's: staged with its shards
    train, val = sources.read_prepared(stats_dir)
    if train.side != config.resize_size:
      raise UserInputError(
        f"{data_dir} was prepared at {train.side}x{train.side} but "
        f"resize_size={config.resize_size}; set --config.resize_size={train.side}"
      )
  else:
    train, val = sources.read_image_folder(staging.image_folder(data_dir, stage_dir))
  if len(train.classes) != config.num_classes:
    raise UserInputError(
      f"num_classes={config.num_classes} but {data_dir} has {len(train.classes)} classes; "
      f"set --config.num_classes={len(train.classes)}"
    )
  if name:  # sampled once, after the cheap checks above
    stats_dir = tfds_source.stats_dir(
      tfds.train, tfds.folder, workdir, config.resize_size, config.stats_images
    )
  stats = load_stats(
    stats_dir,
    config.resize_size,
    config.channel_mean,
    per_pixel=config.mean_subtraction == "image",
  )
  return Data(train, val, stats)


def _synthetic(data_dir: str, config: ml_collections.ConfigDict, stage_dir: str) -> str:
  """Where the synthetic set is, generated there on first use; returns that folder.

  A local (or shared) folder is written by the first process while the others wait. For a
  bucket the set is generated on each host's disk instead (`staging.local_dir`, one process
  per host at a time): it is deterministic and takes seconds, so each host's copy is the one a
  bucket would hold, without an upload, a download or a wait for other hosts."""
  sizes = dict(
    train_per_class=config.synthetic_train_per_class,
    val_per_class=config.synthetic_val_per_class,
    seed=config.synthetic_seed,
  )
  if storage.is_remote(data_dir):
    local = staging.local_dir(data_dir, stage_dir)
    with staging.host_lock(local):
      return synthetic.generate(local, **sizes)
  if jax.process_index() == 0:
    synthetic.generate(data_dir, **sizes)
  sync.barrier("the synthetic data")
  return synthetic.generate(data_dir, **sizes)  # a no-op where the first process already wrote it
