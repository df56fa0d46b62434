"""Starting a run from pretrained weights: `--config.init_from=WORKDIR_OR_FILE`.

The source is a checkpoint of ours (a workdir, its checkpoints/ folder or one step's
folder; only the parameters are read, whatever optimizer or mesh wrote them) or a weights
file `layouts.read_pretrained` reads, adapted to our input pipeline. Every layer whose
shape fits is loaded; when only the class count differs, fc8 keeps this run's fresh
initialisation. Weights holding NaN or Inf are refused, naming the tensors. A run with a
checkpoint of its own resumes instead (train.py).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from alexnet_jax.core import storage
from alexnet_jax.core.errors import UserInputError
from alexnet_jax.model import settings
from alexnet_jax.training import checkpoints, recipes
from alexnet_jax.weights import layouts


def load(source: str) -> tuple[layouts.Params, dict, str]:
  """(parameters, the config.model settings they were trained with, a description)."""
  if storage.path(source).is_dir():
    params, step, ckpt_dir = checkpoints.read_params(source)
    saved = checkpoints.load_config(os.path.dirname(ckpt_dir))
    model = {} if saved is None else saved.model.to_dict()
    what = f"checkpoint {storage.join(ckpt_dir, str(step))}"
    layouts.check_finite(named_tensors(params), what)
    return params, model, what
  params, fmt = layouts.read_pretrained(source)  # refuses NaN and Inf itself
  return params, recipes.trained_with(fmt), f"{fmt} weights {source}"


def named_tensors(params: layouts.Params) -> dict[str, Any]:
  """Each parameter by its name (conv1/kernel ...), for messages that name them."""
  return {f"{name}/{p}": value for name, layer in params.items() for p, value in layer.items()}


def place(params: layouts.Params, target: Any, source: str) -> Any:
  """`params` laid out as `target` (this run's sharded parameters), or a clear error."""
  wrong = {
    name: (
      f"{name} {np.shape(params.get(name, {}).get('kernel'))} (this run: {want['kernel'].shape})"
    )
    for name, want in target.items()
    if any(np.shape(params.get(name, {}).get(p)) != want[p].shape for p in want)
  }
  if wrong:
    hint = (
      "; the paper net's fc6 follows image_size: use the size the weights were trained at "
      "(227 for Caffe's)"
      if "fc6" in wrong
      else ""
    )
    raise UserInputError(f"{source} does not fit this run's net: {', '.join(wrong.values())}{hint}")

  def one(array, like):
    array = np.asarray(array, np.float32)
    return jax.make_array_from_callback(array.shape, like.sharding, lambda index: array[index])

  return jax.tree.map(one, {name: params[name] for name in target}, target)


def init_params(config: ml_collections.ConfigDict, target: Any) -> Any:
  """This run's initial parameters from `config.init_from`; `target` (the freshly
  initialised, sharded parameters) gives the layout and fc8 when the class counts differ."""
  params, trained_with, what = load(config.init_from)
  model = config.model.to_dict()
  if trained_with.get("variant", model["variant"]) != model["variant"]:
    raise UserInputError(
      f"init_from={config.init_from} holds a {trained_with['variant']!r} AlexNet but "
      f"model.variant={model['variant']!r}: set --config.model.variant={trained_with['variant']} "
      "(configs/torchvision_alexnet.py and caffe_alexnet.py set all that published weights need)"
    )
  differ = {
    k: (trained_with[k], model[k])
    for k in settings.names()
    if k not in settings.TRAINING_ONLY and k in trained_with and trained_with[k] != model[k]
  }
  if differ:
    logging.warning(
      "init_from: the weights were trained with %s; this run uses %s",
      {k: v[0] for k, v in differ.items()},
      {k: v[1] for k, v in differ.items()},
    )
  keep = {}  # fc8 stays fresh when only the class count differs; `place` names any other mismatch
  theirs, ours = np.shape(params.get("fc8", {}).get("kernel")), target["fc8"]["kernel"].shape
  if len(theirs) == 2 and theirs[0] == ours[0] and theirs[1] != ours[1]:
    logging.info(
      "init_from: fc8 freshly initialised for %d classes (the weights have %d)", ours[1], theirs[1]
    )
    keep = {"fc8": target["fc8"]}
  placed = place(
    params, {name: layer for name, layer in target.items() if name not in keep}, config.init_from
  )
  logging.info("init_from: %s loaded from %s", ", ".join(placed), what)
  return placed | keep
