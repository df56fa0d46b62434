"""The network: shapes, counts, LRN, initialisation, ablations, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import apply, assert_close, random_params

from alexnet_jax.model import ops
from alexnet_jax.model.alexnet import AlexNet, param_shapes


def features(model, side, batch=1):
  """Shapes of every named activation, without computing anything."""
  x = jnp.zeros((batch, side, side, 3))

  def run():
    variables = model.init(jax.random.key(0), x)
    return apply(model, variables, x, mutable=["intermediates"])[1]["intermediates"]["features"]

  return {k: v.shape[1:] for k, v in jax.eval_shape(run).items()}


def param_count(model, side=227):
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, side, side, 3)))
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"]))


def test_parameter_counts():
  assert param_count(AlexNet(variant="paper")) == 60_965_224
  assert param_count(AlexNet(variant="torchvision"), side=224) == 61_100_840
  # The one-GPU comparison net keeps conv5 and the fc layers full size (§3.2 footnote).
  assert param_count(AlexNet(variant="paper", towers=1)) == 59_798_312


@pytest.mark.parametrize(
  "variant, towers, side",
  [("paper", None, 227), ("paper", 1, 227), ("paper", None, 99), ("torchvision", None, 224)],
)
def test_param_shapes_are_the_models(variant, towers, side):
  """`param_shapes`, which the weight layouts check files against, is what the net creates."""
  model = AlexNet(num_classes=7, variant=variant, towers=towers)
  init = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, side, side, 3)))["params"]
  pool5 = {227: 6, 224: 6, 99: 2}[side]
  assert {n: (p["kernel"].shape, p["bias"].shape) for n, p in init.items()} == param_shapes(
    model.arch, 7, pool5
  )


def test_paper_layer_shapes_and_neuron_counts():
  shapes = features(AlexNet(), 227)
  assert shapes == {
    "conv1": (55, 55, 96),
    "conv2": (27, 27, 256),
    "conv3": (13, 13, 384),
    "conv4": (13, 13, 384),
    "conv5": (13, 13, 256),
    "pool5": (6, 6, 256),
    "fc6": (4096,),
    "fc7": (4096,),
    "logits": (1000,),
  }
  printed = [253_440, 186_624, 64_896, 64_896, 43_264, 4096, 4096, 1000]
  ours = [
    int(np.prod(shapes[k]))
    for k in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "logits")
  ]
  assert ours[1:] == printed[1:]
  assert ours[0] == 290_400 != printed[0]  # the paper's conv1 figure is an erratum: 55*55*96


def test_torchvision_layer_shapes():
  shapes = features(AlexNet(variant="torchvision"), 224)
  assert shapes["conv1"] == (55, 55, 64) and shapes["conv2"] == (27, 27, 192)
  assert shapes["conv3"] == (13, 13, 384) and shapes["conv5"] == (13, 13, 256)
  assert shapes["pool5"] == (6, 6, 256)
  # Its adaptive average pool keeps fc6 at 9216 inputs whatever the image size.
  assert features(AlexNet(variant="torchvision"), 99)["pool5"] == (6, 6, 256)


def test_small_inputs_follow_the_conv_stack():
  shapes = features(AlexNet(num_classes=10), 99)
  assert shapes["pool5"] == (2, 2, 256) and shapes["logits"] == (10,)
  assert features(AlexNet(num_classes=10), 67)["pool5"] == (1, 1, 256)


def numpy_lrn(a, k=2.0, n=5, alpha=1e-4, beta=0.75):
  """The paper's formula, term by term."""
  out = np.empty_like(a, dtype=np.float64)
  big_n = a.shape[-1]
  for i in range(big_n):
    lo, hi = max(0, i - n // 2), min(big_n - 1, i + n // 2)
    s = np.sum(a[..., lo : hi + 1].astype(np.float64) ** 2, axis=-1)
    out[..., i] = a[..., i] / (k + alpha * s) ** beta
  return out


def test_lrn_matches_the_paper_formula():
  a = np.random.default_rng(0).uniform(0, 40, (2, 3, 3, 11)).astype(np.float32)
  np.testing.assert_allclose(ops.lrn(jnp.asarray(a)), numpy_lrn(a), rtol=1e-5)
  # alpha is not divided by n: large activations are normalised strongly.
  assert float(ops.lrn(jnp.full((1, 1, 1, 5), 100.0))[0, 0, 0, 2]) == pytest.approx(
    100 / (2 + 1e-4 * 5e4) ** 0.75, rel=1e-5
  )


def test_model_normalises_each_tower_over_its_own_maps():
  """conv2 recomputed from the captured conv1 output with a per-tower numpy LRN."""
  model = AlexNet(num_classes=5, lrn_alpha=1e-2)  # a larger alpha makes the tower edge visible
  x = jax.random.uniform(jax.random.key(1), (2, 67, 67, 3), maxval=50.0)
  v = {"params": random_params(model, 67)}
  feats = apply(model, v, x, mutable=["intermediates"])[1]["intermediates"]["features"]
  c1 = np.asarray(feats["conv1"])
  k2, b2 = v["params"]["conv2"]["kernel"], v["params"]["conv2"]["bias"]

  def conv2_from(normed):
    outs = []
    for t in range(2):
      h = ops.max_pool(jnp.asarray(normed[..., 48 * t : 48 * (t + 1)], jnp.float32), 3, 2)
      outs.append(jax.nn.relu(ops.conv2d(h, k2[t], b2[t], 1, 2)))
    return np.concatenate(outs, -1)

  per_tower = np.concatenate(
    [numpy_lrn(c1[..., :48], alpha=1e-2), numpy_lrn(c1[..., 48:], alpha=1e-2)], -1
  )
  assert_close(feats["conv2"], conv2_from(per_tower), rtol=1e-4)  # float64 LRN vs float32
  across = numpy_lrn(c1, alpha=1e-2)  # normalising across both towers gives other numbers
  assert not np.allclose(feats["conv2"], conv2_from(across), rtol=1e-4, atol=1e-4)


def test_paper_initialisation():
  params = jax.jit(AlexNet().init)(jax.random.key(0), jnp.zeros((1, 67, 67, 3)))["params"]
  for name, layer in params.items():
    kernel = np.asarray(layer["kernel"])
    assert abs(kernel.std() - 0.01) < 0.0005, name
    assert abs(kernel.mean()) < 0.001, name
    expected_bias = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
    assert np.all(np.asarray(layer["bias"]) == expected_bias), name
    assert kernel.dtype == np.float32
  caffe_like = AlexNet(num_classes=10, bias_one=0.1)
  # Only conv2's bias returned: XLA drops the random draws (seconds at -O0).
  bias = jax.jit(lambda *a: caffe_like.init(*a)["params"]["conv2"]["bias"])
  assert np.all(np.asarray(bias(jax.random.key(0), jnp.zeros((1, 67, 67, 3)))) == np.float32(0.1))


def test_torchvision_initialisation_is_pytorch_default():
  params = jax.jit(AlexNet(variant="torchvision").init)(
    jax.random.key(0), jnp.zeros((1, 224, 224, 3))
  )["params"]
  k = np.asarray(params["conv2"]["kernel"])
  bound = (5 * 5 * 64) ** -0.5
  assert k.max() <= bound and k.min() >= -bound and k.std() > 0.5 * bound
  assert np.abs(np.asarray(params["fc8"]["bias"])).max() <= 4096**-0.5


def test_ablations_change_the_net():
  x = jax.random.normal(jax.random.key(2), (2, 99, 99, 3))
  base = AlexNet(num_classes=10)
  v = {"params": random_params(base, 99)}
  ref = apply(base, v, x)
  for kw in ({"activation": "tanh"}, {"lrn": False}, {"overlapping_pool": False}):
    other = AlexNet(num_classes=10, **kw)
    assert not np.allclose(apply(other, v, x), ref), kw
  one = jax.eval_shape(AlexNet(num_classes=10, towers=1).init, jax.random.key(0), x)["params"]
  assert one["conv3"]["kernel"].shape == (1, 3, 3, 128, 192)  # reads its only tower
  assert v["params"]["conv3"]["kernel"].shape == (2, 3, 3, 256, 192)  # reads both towers
  assert v["params"]["conv4"]["kernel"].shape == (2, 3, 3, 192, 192)  # its own tower only


def test_dropout_needs_an_rng_and_is_off_at_test_time():
  """At test time the net is the one without dropout, whatever dropout rng it is handed (a
  net that dropped units at eval would differ between rngs and from dropout_rate=0)."""
  model = AlexNet(num_classes=10)
  x = jax.random.normal(jax.random.key(2), (4, 67, 67, 3))
  v = {"params": random_params(model, 67)}
  without = apply(AlexNet(num_classes=10, dropout_rate=0.0), v, x)
  for key in (1, 2):
    eval_mode = apply(model, v, x, rngs={"dropout": jax.random.key(key)})
    np.testing.assert_array_equal(eval_mode, without)
  a = apply(model, v, x, train=True, rngs={"dropout": jax.random.key(1)})
  b = apply(model, v, x, train=True, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(a, b)
  with pytest.raises(Exception, match="dropout"):
    apply(model, v, x, train=True)


def test_features_come_from_the_same_pass():
  model = AlexNet(num_classes=10)
  x = jax.random.normal(jax.random.key(2), (3, 99, 99, 3))
  v = {"params": random_params(model, 99)}
  logits, state = apply(model, v, x, mutable=["intermediates"])
  fc7 = state["intermediates"]["features"]["fc7"]
  assert fc7.shape == (3, 4096)
  p = v["params"]["fc8"]
  assert_close(logits, fc7 @ p["kernel"] + p["bias"], rtol=1e-5)  # another matmul kernel


def test_bfloat16_compute_keeps_float32_params():
  x = jax.random.normal(jax.random.key(2), (2, 99, 99, 3))
  low_init = jax.eval_shape(AlexNet(num_classes=10, dtype=jnp.bfloat16).init, jax.random.key(0), x)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(low_init))
  v = {"params": random_params(AlexNet(num_classes=10), 99)}
  ref = apply(AlexNet(num_classes=10), v, x)
  low = apply(AlexNet(num_classes=10, dtype=jnp.bfloat16), v, x)
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
  "kwargs, shape, message",
  [
    ({}, (2, 67, 67), "NHWC with 3 channels"),
    ({}, (2, 67, 67, 1), "NHWC with 3 channels"),
    ({}, (2, 40, 40, 3), "too small"),
    ({"variant": "vgg"}, (2, 67, 67, 3), "unknown variant 'vgg'"),
    ({"activation": "gelu"}, (2, 67, 67, 3), "unknown activation 'gelu'"),
    ({"variant": "torchvision", "towers": 2}, (2, 67, 67, 3), "towers=2"),
  ],
)
def test_bad_input_is_named(kwargs, shape, message):
  with pytest.raises(ValueError, match=message):
    AlexNet(num_classes=10, **kwargs).init(jax.random.key(0), jnp.zeros(shape))
