"""The fast paths equal the plain ones, and the benchmark measures and reports what it says."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import backend, bench, ops, sharding
from alexnet_jax.models import AlexNet

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


@pytest.mark.parametrize("n, beta", [(5, 0.75), (4, 0.75), (5, 0.5), (3, 1.0)])
def test_lrn_gradient_matches_autodiff(n, beta):
  x = jax.random.uniform(jax.random.key(0), (2, 5, 5, 11), maxval=60.0)
  g = jax.random.normal(jax.random.key(1), x.shape)
  args = dict(k=2.0, n=n, alpha=1e-3, beta=beta)  # a large alpha: the cross-channel terms matter
  np.testing.assert_allclose(ops.lrn(x, **args), ops.lrn_autodiff(x, **args), rtol=1e-6)
  np.testing.assert_allclose(
    grad_of(lambda x: ops.lrn(x, **args), x, g),
    grad_of(lambda x: ops.lrn_autodiff(x, **args), x, g),
    rtol=1e-5,
    atol=1e-7,
  )
  assert ops.lrn(x.astype(jnp.bfloat16), **args).dtype == jnp.bfloat16


def loss_and_grads(model, params, x, y, **jit_kwargs):
  def loss(p):
    logits = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(7)})
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

  return jax.jit(jax.value_and_grad(loss), **jit_kwargs)(params)


def assert_same(a, b, rtol=1e-5, atol=1e-7):
  (loss_a, grads_a), (loss_b, grads_b) = a, b
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  for (path, ga), gb in zip(jax.tree_util.tree_leaves_with_path(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(ga, gb, rtol=rtol, atol=atol, err_msg=sharding.path_str(path))


@pytest.mark.parametrize(
  "kwargs, mesh_model",
  [
    ({}, None),
    ({}, 2),
    ({"lrn_scope": "all", "lrn_k": 1.0}, None),
    ({"variant": "torchvision"}, None),
  ],
)
def test_fast_and_plain_nets_have_equal_gradients(kwargs, mesh_model):
  x = jax.random.uniform(jax.random.key(1), (4, 99, 99, 3), minval=-100, maxval=100)
  y = jnp.arange(4) % CLASSES
  params = AlexNet(num_classes=CLASSES, **kwargs).init(jax.random.key(0), x)["params"]
  mesh = None if mesh_model is None else sharding.make_mesh(mesh_model, jax.devices()[:2])
  if mesh is not None:
    params = jax.device_put(params, sharding.tree_shardings(params, mesh))
    x = jax.device_put(x, sharding.batch_sharding(mesh))
  fast, plain = (
    loss_and_grads(AlexNet(num_classes=CLASSES, mesh=mesh, ops_impl=impl, **kwargs), params, x, y)
    for impl in ("fast", "plain")
  )
  assert_same(fast, plain)


def test_cpu_compiler_options_leave_gradients_unchanged():
  options = backend.compiler_options()
  assert options == backend.compiler_options("cpu") and options  # convolutions kept out of YNNPACK
  assert backend.compiler_options("gpu") == {}
  x = jax.random.uniform(jax.random.key(1), (4, 67, 67, 3), minval=-100, maxval=100)
  y = jnp.arange(4) % CLASSES
  model = AlexNet(num_classes=CLASSES)
  params = model.init(jax.random.key(0), x)["params"]
  assert_same(
    loss_and_grads(model, params, x, y, compiler_options=options),
    loss_and_grads(model, params, x, y),
    rtol=1e-4,
    atol=1e-6,
  )


def test_train_flops_are_the_papers():
  assert bench.train_flops_per_image(AlexNet(), 227) == pytest.approx(4.346e9, rel=1e-3)
  # Only the shapes count: the one-tower torchvision net has its own figure.
  assert bench.train_flops_per_image(AlexNet(variant="torchvision"), 224) == pytest.approx(
    6 * 714.2e6, rel=1e-3
  )


def test_peaks_by_device_kind():
  assert backend.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert backend.peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
  assert backend.peak_flops("TPU v5 lite", "float32") is None  # not in the table: MFU left out
  assert backend.peak_flops("cpu", "float32") is None


def test_unsupported_dtype_is_named(monkeypatch):
  backend.check_dtype("bfloat16")  # the CPU computes in bfloat16

  def refuse(*args, **kwargs):
    raise NotImplementedError("no bf16 convolutions here")

  monkeypatch.setattr(jax.lax, "conv_general_dilated", refuse)
  with pytest.raises(
    ValueError, match="bfloat16 is not supported on cpu .*no bf16 convolutions here; use float32"
  ):
    backend.check_dtype("bfloat16")


@pytest.mark.parametrize(
  "case, message",
  [
    (
      bench.Case("2x1", "float32", 3),
      "batch 3 does not divide over mesh 2x1's data axis of size 2",
    ),
    (bench.Case("3x3", "float32", 9), "mesh 3x3 needs 9 devices; this process has 8"),
    (bench.Case("two", "float32", 2), "use 'none' or DATAxMODEL"),
  ],
)
def test_bench_bad_cases_are_named(case, message):
  with pytest.raises(ValueError, match=message):
    bench.build(case, "paper", 67)


def test_bench_report_without_a_known_peak_leaves_mfu_out():
  report = bench.run(
    [bench.Case("none", "float32", 2), bench.Case("1x2", "float32", 2, "plain")],
    "paper",
    67,
    rounds=1,
    round_seconds=0.01,
  )
  assert report["images_per_sec"] == report["results"][0]["images_per_sec"] > 0
  assert (
    "no peak FLOP/s known for 'cpu'" in report["mfu_note"] and "mfu" not in report["results"][0]
  )
  assert (
    report["peak_memory_gb"] == "not available on cpu" and report["results"][1]["memory_gb"] > 0
  )
  assert (
    report["results"][1]["ops_impl"] == "plain"
    and report["results"][0]["train_ratio_to_first"] == 1.0
  )
  assert "| 1x2 | float32 | 2 | plain | backend |" in bench.markdown(report)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_command(run: str, args: list[str], no_torch: bool = False) -> list[str]:
  """Runs `run` (a runpy call) as a command with `args` on 2 simulated devices; its stdout lines.

  Afterwards, in the same process, it asserts that neither TensorFlow nor the configs were
  loaded; `no_torch` makes `import torch` fail as on a machine without it."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  script = (
    "import runpy, sys\nsys.argv = sys.argv[1:]\n"
    + ("sys.modules['torch'] = None\n" if no_torch else "")
    + f"try:\n  {run}\nexcept SystemExit as e:\n  assert not e.code, e.code\n"
    "assert not {'tensorflow', 'ml_collections'} & set(sys.modules)\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", script, "command"] + args,
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.strip().splitlines()


def test_bench_command_prints_json_last_and_imports_no_tensorflow():
  lines = run_command(
    "runpy.run_module('alexnet_jax.bench', run_name='__main__', alter_sys=True)",
    [
      "--batch_size=2",
      "--image_size=67",
      "--dtype=bfloat16",
      "--rounds=1",
      "--round_seconds=0.01",
      "--peak_tflops=1",
    ],
  )
  report = json.loads(lines[-1])
  assert report["results"][0]["dtype"] == "bfloat16" and report["results"][0]["mfu"] > 0
  assert any(line.startswith("| none | bfloat16 | 2 | fast | backend |") for line in lines)


@pytest.mark.parametrize("no_torch", [True, False])
def test_cpu_vs_torch_times_torch_only_where_installed(no_torch):
  if not no_torch:
    pytest.importorskip("torch")
  lines = run_command(
    "runpy.run_path('benchmarks/cpu_vs_torch.py', run_name='__main__')",
    ["--batch_size=2", "--rounds=1", "--round_seconds=0.01"],
    no_torch=no_torch,
  )
  report = json.loads(lines[-1])
  ours = report["results"]["jax none"]
  assert ours["images_per_sec"] > 0
  if no_torch:
    assert (
      set(report["results"]) == {"jax none"}
      and report["torch"] is None
      and ours["speedup_vs_torch_eager"] is None
    )
    assert "torch not installed: no baseline" in lines[0]
  else:
    assert report["torch_baseline"] in report["results"] and ours["speedup_vs_torch_eager"] > 0
