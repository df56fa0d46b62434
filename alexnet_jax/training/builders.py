"""A run's parts built from its config: the model, the optimizer and the sharded state.

Training, evaluation, weight import and restore all build them here, one way. Free of
TensorFlow and of the data (datasets.py), so the benchmark can use them too.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from alexnet_jax.model import settings, sharding
from alexnet_jax.model.alexnet import AlexNet
from alexnet_jax.training import optim, steps
from alexnet_jax.training.steps import TrainState


def create_model(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> AlexNet:
  """The net `config.model` describes; raises ValueError on a bad or unknown setting."""
  return AlexNet(
    num_classes=config.num_classes,
    mesh=mesh,
    # workdirs from before ops_impl have none
    **settings.alexnet_fields(config.model, config.dtype, config.get("ops_impl", "fast")),
  )


def create_optimizer(
  config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> optax.GradientTransformation:
  schedule = optim.make_schedule(
    config.lr_schedule,
    config.learning_rate,
    steps_per_epoch,
    total_steps,
    tuple(config.lr_boundaries_epochs),
    config.lr_decay_factor,
    config.get("warmup_epochs", 0.0),  # workdirs from before warmup have none
    config.get("warmup_start_factor", 1.0),
  )
  return optim.paper_sgd(
    schedule,
    config.momentum,
    config.weight_decay,
    config.weight_decay_on_biases,
    frozen=optim.frozen_layers(config.freeze_all_but_last),
  )


def _init_fn(
  model: AlexNet, tx: optax.GradientTransformation, image_size: int, seed: int
) -> Callable[[], TrainState]:
  unsharded = model.clone(mesh=None)

  def init() -> TrainState:
    params = unsharded.init(jax.random.key(seed), jnp.zeros((1, image_size, image_size, 3)))
    params = params["params"]
    return steps.new_state(params, tx.init(params))

  return init


def abstract_state(
  model: AlexNet, tx: optax.GradientTransformation, image_size: int, mesh: Mesh
) -> TrainState:
  """Shapes, dtypes and shardings of the training state, with nothing allocated: the target
  a checkpoint restores into, whatever mesh wrote it."""
  shapes = jax.eval_shape(_init_fn(model, tx, image_size, 0))
  return jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
    shapes,
    sharding.tree_shardings(shapes, mesh),
  )


def initial_state(
  model: AlexNet, tx: optax.GradientTransformation, image_size: int, seed: int, mesh: Mesh
) -> tuple[TrainState, Any]:
  """(fresh state, its shardings): parameters created directly in their shards, never whole
  on one device."""
  shardings = jax.tree.map(lambda s: s.sharding, abstract_state(model, tx, image_size, mesh))
  return jax.jit(_init_fn(model, tx, image_size, seed), out_shardings=shardings)(), shardings
