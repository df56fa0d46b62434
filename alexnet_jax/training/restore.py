"""A trained net back from a workdir: its config, its parameters, on the devices present now.

Only the parameters are read (orbax partial restore: no optimizer state, no second copy),
placed by the sharding rules on whatever mesh is given, so a checkpoint written on 8
devices restores on 1 and vice versa.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections
from jax.sharding import Mesh

from alexnet_jax.core.errors import UserInputError
from alexnet_jax.model import backend, sharding
from alexnet_jax.model.alexnet import AlexNet
from alexnet_jax.training import builders, checkpoints
from alexnet_jax.training.config_check import DTYPES


@dataclasses.dataclass(frozen=True)
class Restored:
  """A trained net: `model.apply({"params": params}, images)` runs it on `mesh`."""

  config: ml_collections.ConfigDict
  model: AlexNet
  params: Any
  step: int
  mesh: Mesh


def restore(
  workdir: str,
  step: int | None = None,
  mesh: Mesh | None = None,
  variant: str | None = None,
  dtype: str | None = None,
) -> Restored:
  """A trained net's parameters, placed on a mesh, with the model and config that use them.

  Args:
    workdir: a run's folder (its checkpoints/ and config.json), or its checkpoints/ folder.
    step: the checkpoint's step; default the latest good one (a later damaged one is named
      in a warning and skipped, `checkpoints.read_params`). A damaged step asked for is an
      error, never another step.
    mesh: where to place the parameters (default: every device, data-parallel).
    variant: when given, the run must have trained that variant.
    dtype: the dtype the net computes in (float32 or bfloat16), default the run's; the
      parameters stay float32 either way. The returned config says the dtype used.

  Returns:
    Restored(config, model, params, step, mesh): `model.apply({"params": params}, x)`.
  """
  ckpt_dir, _ = checkpoints.locate(workdir)
  config = checkpoints.load_config(os.path.dirname(ckpt_dir))
  if config is None:
    raise UserInputError(
      f"workdir {workdir} has checkpoints but no {checkpoints.CONFIG_FILE}: "
      "the model they hold is unknown"
    )
  if variant is not None and variant != config.model.variant:
    raise UserInputError(
      f"workdir {workdir} holds a {config.model.variant!r} net, not {variant!r}: "
      f"pass --variant={config.model.variant} or the workdir of a {variant!r} run"
    )
  if dtype is not None:
    if dtype not in DTYPES:
      raise UserInputError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    backend.check_dtype(dtype)
    config = config.copy_and_resolve_references()
    config.dtype = dtype
  mesh = sharding.make_mesh(1) if mesh is None else mesh
  model = builders.create_model(config, mesh)
  target = builders.abstract_state(
    model, builders.create_optimizer(config, 1, 1), config.image_size, mesh
  ).params
  params, step, _ = checkpoints.read_params(ckpt_dir, step, target)
  return Restored(config=config, model=model, params=params, step=step, mesh=mesh)
