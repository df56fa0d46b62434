"""Published AlexNet weights into a workdir of ours, and ours out as a PyTorch state dict.

    python -m alexnet_jax.convert --input=alexnet-owt-7be5be79.pth --output=DIR
    python -m alexnet_jax.convert --input=bvlc_alexnet.npy --output=DIR
    python -m alexnet_jax.convert --input=WORKDIR --output=alexnet.pth  # and back

The layouts are weights/layouts.py's, the files weights/readers.py's, and the config each
format's weights run with training/recipes.py's.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from alexnet_jax.core import storage
from alexnet_jax.core.errors import UserInputError
from alexnet_jax.model import sharding
from alexnet_jax.model.alexnet import feature_sides, make_arch, pool_geometry
from alexnet_jax.training import builders, checkpoints, pretrained, recipes
from alexnet_jax.weights.layouts import (
  TORCHVISION_STD,
  check_finite,
  read_pretrained,
  to_torch_grouped,
  to_torchvision,
)
from alexnet_jax.weights.readers import write_state_dict


def import_weights(source: str, workdir: str, fmt: str | None = None) -> None:
  """Writes `source`'s weights as a step-0 checkpoint in workdir, as training writes them
  (a TrainState with fresh optimizer state), with the config they run with beside it:
  `--mode=eval`, extraction and training take workdir as any run's.

  Args:
    source: a weights file: torchvision's or the grouped PyTorch layout (.pth, .pt,
      .safetensors, .npz) or Caffe's bvlc_alexnet .npy; checked from its headers against the
      layout, NaN/Inf refused, before anything is written.
    workdir: a fresh folder for the checkpoint and config.json (refused if it holds one).
    fmt: the layout the file must hold ("torchvision", "torch_grouped", "caffe"); default
      found from the file.

  Returns:
    None; the config written is `recipes.published(format)` (configs/torchvision_alexnet.py,
    caffe_alexnet.py, or default.py for the grouped paper net) with the file's class count.
  """
  workdir = storage.absolute(workdir)  # orbax writes to absolute paths only
  params, found = read_pretrained(source)
  if fmt not in (None, found):
    raise UserInputError(f"{source} holds {found} weights, not --format={fmt}")
  if storage.path(workdir).joinpath("checkpoints").is_dir():
    raise UserInputError(f"{workdir} already holds checkpoints; pass a fresh --output")
  config = recipes.published(found)
  config.num_classes = int(params["fc8"]["bias"].shape[0])
  if config.model.variant == "paper":  # its fc6 follows the image size: take the size they fit
    towers, fan_in = params["fc6"]["kernel"].shape[:2]
    config.model.towers = int(towers)
    config.image_size = _image_size(
      make_arch("paper", towers),
      fan_in // (towers * params["conv5"]["kernel"].shape[-1]),
      config.image_size,
    )
  config.init_from = storage.absolute(source)  # where the weights came from
  mesh = sharding.make_mesh(config.model_parallelism)
  state, _ = builders.initial_state(
    builders.create_model(config, mesh),
    builders.create_optimizer(config, 1, 1),
    config.image_size,
    config.seed,
    mesh,
  )
  state = state.replace(params=pretrained.place(params, state.params, source))
  mgr = checkpoints.manager(workdir, config.keep_checkpoints)
  checkpoints.save(mgr, 0, state)
  mgr.wait_until_finished()
  mgr.close()
  if jax.process_index() == 0:
    checkpoints.save_config(workdir, config)


def _image_size(arch: Any, pool5_area: int, preferred: int) -> int:
  """`preferred` if it gives a pool5 of that area, else the smallest image side that does."""
  for side in [preferred] + list(range(67, 67 + 64 * pool5_area)):
    if feature_sides(arch, side, *pool_geometry(True))["pool5"] ** 2 == pool5_area:
      return side
  raise UserInputError(
    f"no image size gives the {pool5_area} pool5 positions these weights' fc6 reads"
  )


def export_weights(source: str, path: str, fmt: str | None = None, step: int | None = None) -> str:
  """Writes a checkpoint of ours (a workdir, its checkpoints/ or one step's folder) as a
  PyTorch state dict: "torchvision" (undoing TORCHVISION_STD, so the net takes
  torchvision's normalised input) or "torch_grouped". Returns the format written."""
  params, step, ckpt_dir = checkpoints.read_params(source, step)
  check_finite(pretrained.named_tensors(params), f"checkpoint {storage.join(ckpt_dir, str(step))}")
  fmt = fmt or ("torchvision" if np.shape(params["conv1"]["kernel"])[-1] == 64 else "torch_grouped")
  if fmt not in ("torchvision", "torch_grouped"):
    raise UserInputError(
      f"cannot export to {fmt!r}; use --format=torchvision or --format=torch_grouped"
    )
  tensors = (
    to_torchvision(params, TORCHVISION_STD) if fmt == "torchvision" else to_torch_grouped(params)
  )
  write_state_dict(tensors, path)
  return fmt
