"""Towers over devices: the same numbers on every mesh, and talk only where the paper's GPUs
talked."""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import apply, assert_close, paper_params, random_params
from jax.sharding import Mesh

from alexnet_jax.model import sharding
from alexnet_jax.model.alexnet import AlexNet, feature_sides, pool_geometry
from alexnet_jax.training import builders, optim, steps

BATCH, SIDE, CLASSES = 8, 67, 10
COLLECTIVE_OPS = (
  "all-reduce",
  "all-gather",
  "reduce-scatter",
  "all-to-all",
  "ragged-all-to-all",
  "collective-permute",
  "collective-broadcast",
)


@dataclasses.dataclass(frozen=True)
class Collective:
  opcode: str  # as printed: all-reduce, all-gather-start, collective-permute-done, ...
  sizes: tuple[int, ...]  # elements of each array of the result (several for a tuple)
  group: int | None  # devices each transfer spans; None: not printed (a -done op)
  op_name: str  # the JAX scope it came from ("" if XLA dropped it)
  line: str


def _result_type(rest: str) -> tuple[str, str]:
  """(result type, text after it) of an instruction's right-hand side: a tuple type is
  parenthesised, nested and holds spaces, so it ends at its matching parenthesis."""
  if not rest.startswith("("):
    return tuple(rest.split(" ", 1)) if " " in rest else (rest, "")
  depth = 0
  for i, c in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(c, 0)
    if depth == 0:
      return rest[: i + 1], rest[i + 1 :].lstrip()
  raise ValueError(f"unbalanced tuple type in {rest!r}")


def _group_size(attrs: str, devices: int) -> int | None:
  """How many devices each group of a collective spans, from any of XLA's printed forms:
  explicit groups {{0,1},{2,3}}, iota [groups,size]<=[n], mesh[...] {'axis'}, or
  collective-permute's source_target_pairs (2 if any device sends to another)."""
  if m := re.search(r"source_target_pairs=\{(.*?)\}\}", attrs):
    pairs = re.findall(r"(\d+),(\d+)", m.group(1))
    return 2 if any(s != t for s, t in pairs) else 1
  if re.search(r"replica_groups=\{\}", attrs):
    return devices
  if m := re.search(r"replica_groups=\{\{([\d,]*)\}", attrs):
    return len(m.group(1).split(","))
  if m := re.search(r"replica_groups=\[\d+,(\d+)\]<=", attrs):
    return int(m.group(1))
  if m := re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs):
    axes = {a: int(n) for a, n in re.findall(r"'(\w+)'=(\d+)", m.group(1))}
    return math.prod(axes[a] for a in re.findall(r"'(\w+)'", m.group(2)))
  return None


def collectives(hlo: str, devices: int = 2) -> list[Collective]:
  """Every collective instruction of an HLO module's text, in every computation, whatever
  its result (one array, or a tuple: merged collectives and async -start ops)."""
  found = []
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT\s+)?%?[\w.-]+\s*=\s*(.*)", line)
    if not m:
      continue
    result, rest = _result_type(m.group(1))
    op = re.match(r"([\w-]+)\(", rest)
    if not op or re.sub(r"-(start|done)$", "", op.group(1)) not in COLLECTIVE_OPS:
      continue
    name = re.search(r'op_name="([^"]*)"', rest)
    found.append(
      Collective(
        opcode=op.group(1),
        sizes=tuple(
          math.prod(int(d) for d in dims.split(",") if d)
          for dims in re.findall(r"\b[a-z]\w*\[([\d,]*)\]", result)
        ),
        group=_group_size(rest, devices),
        op_name=name.group(1) if name else "",
        line=line.strip(),
      )
    )
  return found


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


@pytest.mark.parametrize(
  "data, model",
  # 4x2 has a data axis; 1x1 and 8x1 hold no tower split (slow suite).
  [
    pytest.param(1, 1, marks=pytest.mark.slow),
    (1, 2),
    (4, 2),
    pytest.param(8, 1, marks=pytest.mark.slow),
  ],
)
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


# An HLO module with the forms a plain regex misses: tuple results (merged all-reduces, async
# -start ops), -done ops; and a collective's name used as another instruction's operand.
TUPLE_HLO = """
ENTRY %main (p: f32[4,8], q: f32[8]) -> (f32[4,8]) {
  %p = f32[4,8]{1,0} parameter(0)
  %q = f32[8]{0} parameter(1)
  %all-reduce.3 = (f32[4,8]{1,0}, f32[8]{0}) all-reduce(%p, %q), channel_id=1, \
replica_groups={{0,1}}, to_apply=%add, metadata={op_name="jit(f)/conv3/psum"}
  %ags = ((f32[4,8]{1,0}), f32[8,8]{1,0}) all-gather-start(%p), channel_id=2, \
replica_groups=[1,2]<=[2], dimensions={0}
  %agd = f32[8,8]{1,0} all-gather-done(%ags)
  %cp = f32[4,8]{1,0} collective-permute(%p), channel_id=3, source_target_pairs={{0,1},{1,0}}
  %ar = f32[] all-reduce(%q), channel_id=4, replica_groups={{0},{1}}, to_apply=%add
  %grads = f32[4,8]{1,0} all-reduce(%p), channel_id=5, \
replica_groups=mesh['axis_0'=2,'axis_1'=1] {'axis_0'}, to_apply=%add
  %sum = f32[4,8]{1,0} add(%all-reduce.3, %cp)
  ROOT %t = (f32[4,8]{1,0}) tuple(%sum)
}
""".replace("\\\n", "")
# The regex this file used before: one result type without spaces, so no tuple.
OLD_REGEX = re.compile(
  r"= \S+ (all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)(-start)?\("
)


def test_hlo_parser_sees_tuple_results_and_async_collectives():
  found = collectives(TUPLE_HLO)
  assert [(c.opcode, c.sizes, c.group) for c in found] == [
    ("all-reduce", (32, 8), 2),
    ("all-gather-start", (32, 64), 2),
    ("all-gather-done", (64,), None),
    ("collective-permute", (32,), 2),
    ("all-reduce", (1,), 1),
    ("all-reduce", (32,), 2),
  ]
  assert found[0].op_name == "jit(f)/conv3/psum"
  old = [line for line in TUPLE_HLO.splitlines() if OLD_REGEX.search(line)]
  assert [line.split()[0] for line in old] == ["%cp", "%ar", "%grads"]  # no tuple


def tower_mesh_traffic(model: AlexNet, batch: int) -> dict[int, str]:
  """The only arrays the paper's towers exchange, by element count: conv3's input (both
  towers' pool2 maps) and the fully connected layers' inputs (pool5, fc6, fc7: one tower's
  or both), each forward and as its gradient backward; the logits and fc8's parameters and
  their gradients (fc8 is whole on every device); scalars (the loss, the finite check).
  Nothing else: not conv1's, conv2's, conv3's, conv4's or conv5's maps, and no tower
  layer's parameters, which stay on their tower's device."""
  arch, (window, stride) = model.arch, pool_geometry(model.overlapping_pool)
  sides = feature_sides(arch, SIDE, window, stride)
  pool2 = (sides["conv2"] - window) // stride + 1
  per_tower = {
    "conv3's input": pool2**2 * arch.conv_widths[1],
    "fc6's input": sides["pool5"] ** 2 * arch.conv_widths[-1],
    "fc7's input": arch.fc_widths[0],
    "fc8's input": arch.fc_widths[1],
  }
  fc8 = arch.towers * arch.fc_widths[1] * model.num_classes
  traffic = {n * batch * t: name for name, n in per_tower.items() for t in (1, 2)}
  return traffic | {
    batch * model.num_classes: "logits",
    fc8: "fc8's kernel",
    fc8 // 2: "half fc8's kernel",
    model.num_classes: "fc8's bias",
    1: "a scalar",
  }


def test_towers_talk_only_at_conv3_and_the_fully_connected_layers():
  """The paper's claim on its own mesh, 1x2 (one tower per device), for the real training
  step: forward, backward and update. The data axis has size 1, so every collective that
  spans more than one device carries data between the two towers."""
  mesh = sharding.make_mesh(2, jax.devices()[:2])
  model, tx, batch = AlexNet(num_classes=CLASSES, mesh=mesh), optim.paper_sgd(0.01), 4
  state = builders.abstract_state(model, tx, SIDE, mesh)
  shardings = jax.tree.map(lambda s: s.sharding, state)
  kernel = state.params["conv1"]["kernel"]
  assert shardings.params["conv1"]["kernel"].shard_shape(kernel.shape)[0] == 1  # a tower each
  train_step, _ = steps.jit_steps(model, tx, shardings, mesh, seed=0)
  spec = jax.ShapeDtypeStruct
  images = {
    "image": spec((batch, SIDE, SIDE, 3), jnp.uint8),
    "offset": spec((batch, 2), jnp.int32),
    "flip": spec((batch,), jnp.bool_),
    "label": spec((batch,), jnp.int32),
  }
  hlo = train_step.lower(state, images, spec((SIDE, SIDE, 3), jnp.float32)).compile().as_text()
  allowed = tower_mesh_traffic(model, batch)
  layers = set()
  for c in collectives(hlo):
    if c.group == 1:  # within one device: the data axis's gradient sum, of size 1 here
      continue
    for size in c.sizes:
      assert size in allowed, f"towers exchange {size} elements: {c.line}"
      # conv5's maps have the shape of conv3's input: their scope tells them apart.
      if allowed[size] == "conv3's input":
        assert "/conv3/" in c.op_name, f"conv-sized maps cross outside conv3: {c.line}"
    layers |= set(re.findall(r"/(conv\d|fc\d)/", c.op_name))
  assert {"conv3", "fc6", "fc7"} <= layers, layers  # and they do talk there


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
    (lambda: sharding.make_mesh(4), "the model axis has size 4; it must be 1"),
    (
      lambda: AlexNet(mesh=Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))),
      "model axis has size 4",
    ),
    (
      lambda: AlexNet(mesh=Mesh(np.array(jax.devices()).reshape(4, 2), ("batch", "tower"))),
      "needs \\('data', 'model'\\)",
    ),
    (
      lambda: AlexNet(variant="torchvision", mesh=sharding.make_mesh(2)),
      "1 tower\\(s\\) cannot be split over a model axis of size 2",
    ),
  ],
)
def test_bad_meshes_are_named(build, message):
  with pytest.raises(ValueError, match=message):
    build()


def test_lrn_across_all_maps_is_the_same_on_a_tower_mesh():
  """Caffe's LRN reads every tower's maps: with one tower per device it gathers them."""
  x = jax.random.uniform(jax.random.key(1), (4, 67, 67, 3), maxval=100.0)
  # a large alpha makes the tower edge count
  model = AlexNet(num_classes=5, lrn_alpha=1e-2, lrn_scope="all")
  params = paper_params(67, num_classes=5)
  ref = apply(model, {"params": params}, x)
  mesh = sharding.make_mesh(2)  # 4x2: one tower per device
  params = jax.device_put(params, sharding.tree_shardings(params, mesh))
  sharded = apply(
    model.clone(mesh=mesh), {"params": params}, jax.device_put(x, sharding.batch_sharding(mesh))
  )
  assert_close(sharded, ref, rtol=1e-5)  # one tower per device: other sum orders
  with pytest.raises(ValueError, match="unknown lrn_scope 'gpu'"):
    AlexNet(lrn_scope="gpu")


def test_batch_must_divide_over_data():
  model = AlexNet(num_classes=CLASSES, mesh=sharding.make_mesh(2))
  with pytest.raises(
    ValueError, match="batch 6 does not divide over the mesh's data axis of size 4"
  ):
    model.init(jax.random.key(0), jnp.zeros((6, SIDE, SIDE, 3)))
