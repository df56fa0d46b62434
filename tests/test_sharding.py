"""Towers over devices: the same numbers on every mesh, and talk only where the paper's GPUs
talked."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, random_params
from jax.sharding import Mesh

from alexnet_jax import sharding
from alexnet_jax.models import AlexNet

BATCH, SIDE, CLASSES = 8, 67, 10
COLLECTIVE = re.compile(
  r"= \S+ (all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)(-start)?\("
)


def loss_fn(model):
  def loss(params, x, y):
    logits = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(7)})
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)), logits

  return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.fixture(scope="module")
def problem():
  x = jax.random.normal(jax.random.key(1), (BATCH, SIDE, SIDE, 3))
  y = jnp.arange(BATCH) % CLASSES
  params = random_params(AlexNet(num_classes=CLASSES), SIDE)
  (_, logits), grads = loss_fn(AlexNet(num_classes=CLASSES))(params, x, y)
  return x, y, params, logits, grads


@pytest.mark.parametrize("data, model", [(1, 1), (1, 2), (4, 2), (8, 1)])
def test_logits_and_gradients_equal_on_every_mesh(problem, data, model):
  x, y, params, ref_logits, ref_grads = problem
  mesh = sharding.make_mesh(model, jax.devices()[: data * model])
  assert dict(mesh.shape) == {"data": data, "model": model}
  params = jax.device_put(params, sharding.tree_shardings(params, mesh))
  x = jax.device_put(x, sharding.batch_sharding(mesh))
  (_, logits), grads = loss_fn(AlexNet(num_classes=CLASSES, mesh=mesh))(params, x, y)
  # Other meshes sum the towers' and the batch's parts in other orders (`assert_close`).
  assert_close(logits, ref_logits, rtol=1e-5)
  for (path, g), ref in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
    assert_close(g, ref, rtol=1e-4, err_msg=sharding.path_str(path))
  # Each tower's parameters live on their own device of the pair.
  if model == 2:
    shard = params["conv1"]["kernel"].addressable_shards[0]
    assert shard.data.shape[0] == 1


def test_collectives_only_at_conv3_and_fully_connected_layers():
  mesh = sharding.make_mesh(2, jax.devices()[:2])
  model = AlexNet(num_classes=CLASSES, mesh=mesh)
  x = jnp.zeros((4, SIDE, SIDE, 3))
  params = random_params(AlexNet(num_classes=CLASSES), SIDE)
  hlo = loss_fn(model).lower(params, x, jnp.zeros(4, jnp.int32)).compile().as_text()
  layers = []
  for line in hlo.splitlines():
    if COLLECTIVE.search(line):
      op_name = re.search(r'op_name="([^"]*)"', line).group(1)
      layers.append(re.search(r"(conv\d|pool5|fc\d)/", op_name + "/").group(1))
  assert layers, "a 1x2 mesh must exchange activations somewhere"
  assert set(layers) == {"conv3", "fc6", "fc7", "fc8"}, layers
  assert not {"conv1", "conv2", "conv4", "conv5", "pool5"} & set(layers)


def test_mesh_axes_are_data_and_model():
  mesh = sharding.make_mesh(2)
  assert mesh.axis_names == ("data", "model") and dict(mesh.shape) == {"data": 4, "model": 2}
  assert dict(sharding.make_mesh(1).shape) == {"data": 8, "model": 1}


def test_sharding_rules_split_towers_and_replicate_the_rest():
  params = jax.eval_shape(
    AlexNet(num_classes=CLASSES).init, jax.random.key(0), jnp.zeros((1, SIDE, SIDE, 3))
  )["params"]
  mesh = sharding.make_mesh(2)
  specs = jax.tree.map(
    lambda s: tuple(s.spec), sharding.tree_shardings({"opt": {"trace": params}}, mesh)
  )
  assert specs["opt"]["trace"]["conv1"]["kernel"] == ("model",)
  assert specs["opt"]["trace"]["fc7"]["bias"] == ("model",)
  assert specs["opt"]["trace"]["fc8"]["kernel"] == ()


@pytest.mark.parametrize(
  "build, message",
  [
    (lambda: sharding.make_mesh(4), "model=4"),
    (
      lambda: AlexNet(mesh=Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))),
      "model axis has size 4",
    ),
    (
      lambda: AlexNet(mesh=Mesh(np.array(jax.devices()).reshape(4, 2), ("batch", "tower"))),
      "needs \\('data', 'model'\\)",
    ),
    (lambda: AlexNet(variant="torchvision", mesh=sharding.make_mesh(2)), "use model=1"),
  ],
)
def test_bad_meshes_are_named(build, message):
  with pytest.raises(ValueError, match=message):
    build()


def test_batch_must_divide_over_data():
  model = AlexNet(num_classes=CLASSES, mesh=sharding.make_mesh(2))
  with pytest.raises(
    ValueError, match="batch 6 does not divide over the mesh's data axis of size 4"
  ):
    model.init(jax.random.key(0), jnp.zeros((6, SIDE, SIDE, 3)))
