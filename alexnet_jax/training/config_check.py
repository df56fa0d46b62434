"""Checks a config before any data is read or anything compiled; one clear line per mistake."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import ml_collections

from alexnet_jax.core import storage
from alexnet_jax.core.errors import UserInputError
from alexnet_jax.data.dataset_names import DATASETS, tfds_name
from alexnet_jax.model import backend
from alexnet_jax.model.alexnet import LAYERS, check_model_axis, feature_sides, pool_geometry
from alexnet_jax.training import builders, optim
from alexnet_jax.weights.readers import SUFFIXES

DTYPES = ("float32", "bfloat16")


def same_setting(a: Any, b: Any) -> bool:
  """Whether two values of a setting are equal as config.json reads them back: tuples and
  lists alike, and NaN equal to NaN (tests poison a run with a NaN mean; NaN != NaN)."""
  return a == b or json.dumps(a, default=repr) == json.dumps(b, default=repr)


def check_config(
  config: ml_collections.ConfigDict,
  num_devices: int | None = None,
  process_count: int | None = None,
) -> None:
  """Raises UserInputError naming the bad value and the fix."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  if config.num_devices:
    if not 0 < config.num_devices <= num_devices or process_count > 1:
      raise UserInputError(
        f"num_devices={config.num_devices}: use 0 (all) or 1..{num_devices}, on one process only"
      )
    num_devices = config.num_devices
  first = config.get("first_device", 0)
  if first and (not config.num_devices or first + config.num_devices > jax.device_count()):
    raise UserInputError(
      f"first_device={first} needs num_devices > 0 with first_device + num_devices <= "
      f"{jax.device_count()}"
    )

  def bad(message):
    raise UserInputError(message)

  if config.dataset not in DATASETS and not tfds_name(config.dataset):
    bad(
      f"unknown dataset {config.dataset!r}; set --config.dataset to one of {DATASETS} or "
      "tfds:NAME (a dataset TFDS built, e.g. tfds:imagenet2012)"
    )
  if tfds_name(config.dataset) and config.stats_images < 1:
    bad(f"stats_images={config.stats_images}: sample at least 1 training image for the mean image")
  if config.dataset == "image_folder" and not config.data_dir:
    bad(
      "dataset 'image_folder' needs --config.data_dir=DIR "
      "(with DIR/train/<class>/* and DIR/val/<class>/*)"
    )
  if config.dtype not in DTYPES:
    bad(f"unknown dtype {config.dtype!r}; set --config.dtype to one of {DTYPES}")
  cpu_sets = ("auto", *backend.CPU_OPTION_SETS)
  if config.get("cpu_compiler_options", "auto") not in cpu_sets:
    bad(
      f"unknown cpu_compiler_options {config.cpu_compiler_options!r}; set "
      f"--config.cpu_compiler_options to one of {cpu_sets}"
    )
  if config.lr_schedule not in optim.SCHEDULES:
    bad(
      f"unknown lr_schedule {config.lr_schedule!r}; "
      f"set --config.lr_schedule to one of {optim.SCHEDULES}"
    )
  try:  # the model's own checks: unknown keys, variant, towers, activation, dropout, LRN, ops
    arch = builders.create_model(config).arch
  except ValueError as e:
    bad(f"the model settings: {e}")
  try:
    check_model_axis(config.model_parallelism, arch.towers)
  except ValueError as e:
    bad(f"model_parallelism={config.model_parallelism}: {e}; set --config.model_parallelism=1")
  if num_devices % config.model_parallelism:
    bad(
      f"model_parallelism={config.model_parallelism} needs an even number of devices, "
      f"found {num_devices}"
    )
  data_size = num_devices // config.model_parallelism
  if config.batch_size <= 0:
    bad(f"batch_size={config.batch_size} must be positive (the global batch, over all devices)")
  if config.batch_size % data_size or config.batch_size % process_count:
    bad(
      f"batch_size={config.batch_size} does not divide over the {data_size} data-parallel devices "
      f"({process_count} process(es)); use a multiple of {math.lcm(data_size, process_count)}"
    )
  if config.mean_subtraction not in ("image", "channel"):
    bad(
      f"mean_subtraction={config.mean_subtraction!r}; "
      "use 'image' (the paper's mean image) or 'channel'"
    )
  if config.eval_crops not in (1, 10):
    bad(f"eval_crops={config.eval_crops}; use 1 (centre crop) or 10 (the paper's ten patches)")
  if not (math.isfinite(config.learning_rate) and config.learning_rate > 0):
    bad(f"learning_rate={config.learning_rate} must be a positive finite number")
  warmup, boundaries = config.get("warmup_epochs", 0.0), tuple(config.lr_boundaries_epochs)
  first_drop = min(boundaries) if config.lr_schedule == "piecewise" and boundaries else math.inf
  if not 0 <= warmup < first_drop:
    bad(
      f"warmup_epochs={warmup} must be >= 0 and less than the first rate drop "
      f"(lr_boundaries_epochs={boundaries})"
    )
  if warmup and config.lr_schedule == "plateau":
    bad(
      "warmup_epochs needs a schedule, not lr_schedule='plateau' (the loop lowers that rate); "
      "set --config.warmup_epochs=0 or another --config.lr_schedule"
    )
  if not 0 <= config.get("warmup_start_factor", 1.0) <= 1:
    bad(f"warmup_start_factor={config.warmup_start_factor} must be in [0, 1] (Goyal et al.: 1/k)")
  if not 0 <= config.momentum < 1:
    bad(f"momentum={config.momentum} must be in [0, 1)")
  if config.pca_noise_std < 0:
    bad(f"pca_noise_std={config.pca_noise_std} must be >= 0 (0 turns the colour noise off)")
  if config.num_classes < 1:
    bad(f"num_classes={config.num_classes} must be at least 1")
  if config.resize_size < config.image_size:
    bad(
      f"resize_size={config.resize_size} is smaller than the crop image_size={config.image_size}; "
      "the crop is taken from the rescaled image"
    )
  try:
    feature_sides(arch, config.image_size, *pool_geometry(config.model.overlapping_pool))
  except ValueError as e:
    bad(f"image_size={config.image_size}: {e}")
  for key in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    if config[key] < 1:
      bad(f"{key}={config[key]} must be at least 1")
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    bad("set --config.num_epochs or --config.num_train_steps to a positive number")
  if not 0 <= config.freeze_all_but_last <= len(LAYERS):
    bad(
      f"freeze_all_but_last={config.freeze_all_but_last} must be between 0 (train every layer) and "
      f"{len(LAYERS)}; 1 trains fc8 only"
    )
  source = config.init_from
  if source and not storage.path(source).exists():
    bad(
      f"init_from={source!r} does not exist; "
      f"give a workdir of ours or a weights file ({', '.join(SUFFIXES)})"
    )
  suffix = os.path.splitext(source)[1].lower()
  if source and not storage.path(source).is_dir() and suffix not in SUFFIXES:
    bad(
      f"init_from={source!r}: unknown weights format; "
      f"use a workdir of ours or a {', '.join(SUFFIXES)} file"
    )
