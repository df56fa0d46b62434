"""`config.model` holds AlexNet's own fields: the one mapping from a config to the module.

A new model option is a field of `AlexNet` (alexnet.py) and a key of the paper's config
(training/recipes.py); nothing between them lists the options again. What a config says
differently from the module (ops_impl "auto", dtype names, `towers` under another variant)
is translated here only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from alexnet_jax.model import backend
from alexnet_jax.model.alexnet import AlexNet

# AlexNet's fields a run sets from outside `config.model` (flax adds parent and name).
_SET_ELSEWHERE = ("num_classes", "mesh", "dtype", "ops_impl", "parent", "name")
# Settings that shape training only (initialisation, dropout): weights trained under other
# values compute the same function. Every other setting changes what the weights compute.
TRAINING_ONLY = ("dropout_rate", "init_std", "bias_one")


def names() -> tuple[str, ...]:
  """The keys `config.model` may hold: AlexNet's fields, in their order."""
  return tuple(f.name for f in dataclasses.fields(AlexNet) if f.name not in _SET_ELSEWHERE)


def alexnet_fields(
  model: Mapping[str, Any], dtype: str = "float32", ops_impl: str = "fast"
) -> dict[str, Any]:
  """AlexNet's keyword arguments for a config's `model` settings and its `dtype` and
  `ops_impl` ("auto": the backend's choice); ValueError naming any key AlexNet lacks."""
  unknown = sorted(set(model) - set(names()))
  if unknown:
    raise ValueError(
      f"unknown model setting(s) {', '.join(unknown)}; AlexNet's are {', '.join(names())}"
    )
  fields = dict(model)
  if fields.get("variant", "paper") != "paper":
    fields["towers"] = None  # one tower, whatever the paper config a run started from says
  return fields | {
    "dtype": jnp.dtype(dtype),
    "ops_impl": backend.default_ops_impl() if ops_impl == "auto" else ops_impl,
  }
