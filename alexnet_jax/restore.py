"""A trained net back from a workdir: its config, its parameters, on the devices present now.

Only the parameters are read (orbax partial restore: no optimizer state, no second copy),
placed by the sharding rules on whatever mesh is given, so a checkpoint written on 8
devices restores on 1 and vice versa.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from alexnet_jax import checkpoints, sharding, train
from alexnet_jax.errors import UserInputError
from alexnet_jax.models import AlexNet


@dataclasses.dataclass(frozen=True)
class Restored:
  """A trained net: `model.apply({"params": params}, images)` runs it on `mesh`."""

  config: ml_collections.ConfigDict
  model: AlexNet
  params: Any
  step: int
  mesh: Mesh


def restore(
  workdir: str, step: int | None = None, mesh: Mesh | None = None, variant: str | None = None
) -> Restored:
  """The checkpoint at `step` (default: the latest) of the run in workdir.

  mesh: where to place the parameters (default: every device, data-parallel). variant:
  when given, the run must have trained that variant.
  """
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise UserInputError(
      f"workdir {workdir} has no checkpoints/: train first with "
      f"python -m alexnet_jax.main --workdir={workdir}, or pass the workdir of a run"
    )
  config = checkpoints.load_config(workdir)
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
  mgr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(create=False))
  try:
    steps = sorted(mgr.all_steps())
    if not steps:
      raise UserInputError(
        f"{ckpt_dir} holds no finished checkpoint: train first, or pass another workdir"
      )
    step = steps[-1] if step is None else step
    if step not in steps:
      raise UserInputError(f"{ckpt_dir} has no checkpoint at step {step}; it has steps {steps}")
    mesh = sharding.make_mesh(1) if mesh is None else mesh
    model = train.create_model(config, mesh)
    target = _abstract_params(model, config.image_size, mesh)
    restored = mgr.restore(
      step,
      args=ocp.args.PyTreeRestore(
        item={"params": target},
        restore_args=ocp.checkpoint_utils.construct_restore_args({"params": target}),
        partial_restore=True,
      ),
    )
  finally:
    mgr.close()
  return Restored(config=config, model=model, params=restored["params"], step=step, mesh=mesh)


def _abstract_params(model: AlexNet, image_size: int, mesh: Mesh) -> Any:
  """Shapes, dtypes and shardings of the parameters, with nothing allocated."""
  image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  shapes = jax.eval_shape(model.clone(mesh=None).init, jax.random.key(0), image)["params"]
  return jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
    shapes,
    sharding.tree_shardings(shapes, mesh),
  )
