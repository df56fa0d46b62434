"""The fast ops (hand-written pooling and LRN gradients) and the CPU compiler options compute
what XLA's plain ops compute, in the net as in isolation, on one device and on a tower mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, random_params

from alexnet_jax.model import backend, ops, sharding
from alexnet_jax.model.alexnet import AlexNet

CLASSES = 10


def grad_of(f, x, cotangent):
  return jax.jit(jax.grad(lambda x: jnp.sum(f(x) * cotangent)))(x)


@pytest.mark.parametrize(
  "shape, window, stride",
  [
    ((2, 55, 55, 8), 3, 2),
    ((2, 27, 26, 5), 3, 2),
    ((2, 13, 13, 4), 3, 2),
    ((1, 12, 12, 3), 2, 2),
    ((1, 9, 9, 2), 3, 3),
  ],
)
def test_max_pool_and_its_gradient_match_reduce_window(shape, window, stride):
  # Rounded ReLU outputs: many ties, which reduce_window's gradient gives to the first maximum.
  x = jnp.round(jax.nn.relu(jax.random.normal(jax.random.key(0), shape)) * 4) / 4
  ref = ops.max_pool_reduce_window(x, window, stride)
  np.testing.assert_array_equal(ops.max_pool(x, window, stride), ref)
  g = jax.random.normal(jax.random.key(1), ref.shape)
  fast = grad_of(lambda x: ops.max_pool(x, window, stride), x, g)
  plain = grad_of(lambda x: ops.max_pool_reduce_window(x, window, stride), x, g)
  np.testing.assert_allclose(
    fast, plain, rtol=1e-6, atol=1e-6
  )  # the same terms, summed in another order
  np.testing.assert_array_equal(fast != 0, plain != 0)


def paper_lrn(a: np.ndarray, k: float, n: int, alpha: float, beta: float) -> np.ndarray:
  """The paper's LRN (§3.3) in float64, map by map: b_i = a_i / (k + alpha * sum of a_j^2 over
  the n maps centred on i, clipped at the ends)^beta, alpha not divided by n. For even n
  the window holds one more map before i than after, as PyTorch's."""
  a, maps = np.asarray(a, np.float64), a.shape[-1]
  out = np.empty_like(a)
  for i in range(maps):
    window = a[..., max(0, i - n // 2) : min(maps, i + (n - 1) // 2 + 1)]
    out[..., i] = a[..., i] / (k + alpha * np.sum(window**2, axis=-1)) ** beta
  return out


@pytest.mark.parametrize("n, beta", [(5, 0.75), (4, 0.75), (5, 0.5), (3, 1.0)])
def test_lrn_is_the_papers_formula_and_its_gradient_autodiffs(n, beta):
  x = jax.random.uniform(jax.random.key(0), (2, 5, 5, 11), maxval=60.0)
  g = jax.random.normal(jax.random.key(1), x.shape)
  args = dict(k=2.0, n=n, alpha=1e-3, beta=beta)  # a large alpha: the cross-channel terms matter
  ref = paper_lrn(np.asarray(x), **args)
  for lrn in (ops.lrn, ops.lrn_autodiff):  # sums of squares: no cancellation, a few ulp
    np.testing.assert_allclose(lrn(x, **args), ref, rtol=1e-5)
  assert_close(  # the forward is right: autodiff's gradient is the reference for the fast one
    grad_of(lambda x: ops.lrn(x, **args), x, g),
    grad_of(lambda x: ops.lrn_autodiff(x, **args), x, g),
    rtol=1e-5,
  )
  assert ops.lrn(x.astype(jnp.bfloat16), **args).dtype == jnp.bfloat16


def loss_and_grads(model, params, x, y, **jit_kwargs):
  def loss(p):
    logits = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(7)})
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

  return jax.jit(jax.value_and_grad(loss), **jit_kwargs)(params)


def assert_same(a, b, rtol=1e-5):
  """Equal losses and gradients, each gradient to rtol of its largest entry (`assert_close`)."""
  (loss_a, grads_a), (loss_b, grads_b) = a, b
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)  # a mean of positive terms
  for (path, ga), gb in zip(jax.tree_util.tree_leaves_with_path(grads_a), jax.tree.leaves(grads_b)):
    assert_close(ga, gb, rtol=rtol, err_msg=sharding.path_str(path))


@pytest.mark.parametrize(
  "kwargs, mesh_model",
  [
    ({}, None),
    pytest.param({}, 2, marks=pytest.mark.slow),  # test_sharding: the fast ops on meshes
    pytest.param({"lrn_scope": "all", "lrn_k": 1.0}, None, marks=pytest.mark.slow),
    pytest.param({"variant": "torchvision"}, None, marks=pytest.mark.slow),  # other pools only
  ],
)
def test_fast_and_plain_nets_have_equal_gradients(kwargs, mesh_model):
  x = jax.random.uniform(jax.random.key(1), (4, 67, 67, 3), minval=-100, maxval=100)
  y = jnp.arange(4) % CLASSES
  params = random_params(AlexNet(num_classes=CLASSES, **kwargs), 67)
  mesh = None if mesh_model is None else sharding.make_mesh(mesh_model, jax.devices()[:2])
  if mesh is not None:
    params = jax.device_put(params, sharding.tree_shardings(params, mesh))
    x = jax.device_put(x, sharding.batch_sharding(mesh))
  fast, plain = (
    loss_and_grads(AlexNet(num_classes=CLASSES, mesh=mesh, ops_impl=impl, **kwargs), params, x, y)
    for impl in ("fast", "plain")
  )
  assert_same(fast, plain)


def test_cpu_compiler_choice_is_a_named_set():
  options = backend.compiler_options("cpu")  # convolutions kept out of YNNPACK
  assert options == backend.cpu_option_set("eigen_conv") != {}
  assert backend.compiler_options() == options
  assert backend.compiler_options("gpu") == backend.compiler_options("tpu") == {}
  assert backend.compiler_options("cpu", "no_ynnpack") == backend.cpu_option_set("no_ynnpack")
  assert backend.compiler_options("cpu", "auto") == options
  with pytest.raises(ValueError, match="unknown compiler option set 'fastest'"):
    backend.compiler_options("gpu", "fastest")
  with pytest.raises(ValueError, match="unknown compiler option set 'fast': use one of xla, "):
    backend.cpu_option_set("fast")


@pytest.mark.parametrize(
  "name",
  [  # the sets measured and left: in the slow suite
    n if n in ("eigen_conv", "no_ynnpack") else pytest.param(n, marks=pytest.mark.slow)
    for n in backend.CPU_OPTION_SETS
    if n != "xla"
  ],
)
def test_every_cpu_option_set_leaves_outputs_and_gradients_unchanged(name):
  """Each set bench compares (and the one training and extraction use) against XLA's defaults."""
  options = backend.cpu_option_set(name)
  assert options  # this XLA knows the set: it is really compared
  x = jax.random.uniform(jax.random.key(1), (4, 67, 67, 3), minval=-100, maxval=100)
  y = jnp.arange(4) % CLASSES
  model = AlexNet(num_classes=CLASSES)
  params = random_params(model, 67)
  assert_same(  # other convolution kernels: other summation orders
    loss_and_grads(model, params, x, y, compiler_options=options),
    loss_and_grads(model, params, x, y),
    rtol=1e-4,
  )
  forward = lambda **kw: jax.jit(lambda p: model.apply({"params": p}, x), **kw)(params)
  assert_close(forward(compiler_options=options), forward(), rtol=1e-4)
