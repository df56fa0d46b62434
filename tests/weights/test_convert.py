"""Published weights in and out: numpy reference forward passes, exact round trips, files,
the restricted unpickler, PyTorch and torchvision themselves (required in CI), the command line."""

import importlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
  TORCHVISION_SHAPES,
  apply,
  assert_close,
  need_torch,
  normal,
  paper_params,
  random_torchvision,
)
from numpy.lib.stride_tricks import sliding_window_view

from alexnet_jax.core.errors import UserInputError
from alexnet_jax.model import sharding
from alexnet_jax.model.alexnet import LAYERS, AlexNet, param_shapes
from alexnet_jax.training import builders, checkpoints, published
from alexnet_jax.weights import layouts

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CAFFE_LRN = dict(lrn_scope="all", lrn_k=1.0, lrn_alpha=2e-5)


def caffe_shapes(side, num_classes):
  """bvlc_alexnet in caffe-tensorflow's .npy: HWIO, grouped conv2/4/5, (in, out), fc6 rows HWC."""
  return {
    "conv1": (11, 11, 3, 96),
    "conv2": (5, 5, 48, 256),
    "conv3": (3, 3, 256, 384),
    "conv4": (3, 3, 192, 384),
    "conv5": (3, 3, 192, 256),
    "fc6": (256 * side * side, 4096),
    "fc7": (4096, 4096),
    "fc8": (4096, num_classes),
  }


@pytest.fixture(scope="module")
def torchvision_sd():
  return random_torchvision(np.random.default_rng(0))


def random_caffe(rng, side, num_classes):
  return {
    name: [normal(rng, s, np.sqrt(2 / np.prod(s[:-1]))), normal(rng, s[-1:], 0.1)]
    for name, s in caffe_shapes(side, num_classes).items()
  }


# A numpy forward pass written from the frameworks' definitions: NHWC, HWIO, float64.


def np_conv(x, w, b, stride, pad, groups):
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  win = sliding_window_view(x, w.shape[:2], axis=(1, 2))[
    :, ::stride, ::stride
  ]  # n, oh, ow, c, kh, kw
  outs = [
    np.tensordot(xg, wg, axes=([3, 4, 5], [2, 0, 1]))
    for xg, wg in zip(np.split(win, groups, 3), np.split(w, groups, 3))
  ]
  return np.concatenate(outs, -1) + b


def np_lrn(a, k, scale, beta, groups, n=5):
  """b = a / (k + scale * sum of a^2 over n neighbouring maps)^beta, within each group."""
  outs = []
  for g in np.split(a, groups, -1):
    s = sliding_window_view(np.pad(g**2, [(0, 0)] * 3 + [(n // 2, n // 2)]), n, axis=-1).sum(-1)
    outs.append(g / (k + scale * s) ** beta)
  return np.concatenate(outs, -1)


def np_forward(layers, x, *, pad1, groups, lrn, flatten):
  """layers: {name: (HWIO kernel or (in, out) matrix, bias)}; lrn: None or (k, scale, beta,
  groups)."""
  h = x.astype(np.float64)
  for name, stride, pad in (
    ("conv1", 4, pad1),
    ("conv2", 1, 2),
    ("conv3", 1, 1),
    ("conv4", 1, 1),
    ("conv5", 1, 1),
  ):
    h = np.maximum(
      np_conv(h, *layers[name], stride, pad, groups if name in ("conv2", "conv4", "conv5") else 1),
      0,
    )
    if lrn and name in ("conv1", "conv2"):
      h = np_lrn(h, *lrn)
    if name in ("conv1", "conv2", "conv5"):
      h = sliding_window_view(h, (3, 3), axis=(1, 2))[:, ::2, ::2].max(axis=(-1, -2))
  h = (h.transpose(0, 3, 1, 2) if flatten == "chw" else h).reshape(len(h), -1)
  for name in ("fc6", "fc7"):
    h = np.maximum(h @ layers[name][0] + layers[name][1], 0)
  return h @ layers["fc8"][0] + layers["fc8"][1]


def torch_layers(state_dict, prefixes):
  """A PyTorch-layout state dict as the reference's layers: OIHW -> HWIO, (out, in) -> (in, out)."""
  out = {}
  for name, prefix in prefixes.items():
    w = state_dict[f"{prefix}.weight"]
    out[name] = (w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T, state_dict[f"{prefix}.bias"])
  return out


# Our layers in order against the hand-written table's (its weights come in layer order).
TORCHVISION_PREFIXES = {
  name: key.removesuffix(".weight") for name, key in zip(LAYERS, list(TORCHVISION_SHAPES)[::2])
}


def assert_logits_close(ours, ref):
  """Ours in float32 against the float64 reference: float32 rounding over eight layers."""
  assert_close(ours, ref, rtol=1e-4)


@pytest.mark.parametrize(
  "variant, towers, side",
  [("paper", None, 227), ("paper", 1, 227), ("paper", None, 99), ("torchvision", None, 224)],
)
def test_param_shapes_are_the_models(variant, towers, side):
  model = AlexNet(num_classes=7, variant=variant, towers=towers)
  init = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, side, side, 3)))["params"]
  pool5 = {227: 6, 224: 6, 99: 2}[side]
  assert {n: (p["kernel"].shape, p["bias"].shape) for n, p in init.items()} == param_shapes(
    model.arch, 7, pool5
  )


def test_configs_run_the_weights_as_trained():
  for fmt, name in published.CONFIGS.items():
    model = importlib.import_module(f"configs.{name}").get_config().model
    assert {k: model[k] for k in layouts.TRAINED_WITH[fmt]} == layouts.TRAINED_WITH[fmt], name


def test_torchvision_state_dict_gives_the_numpy_reference_logits(torchvision_sd):
  sd, rng = torchvision_sd, np.random.default_rng(0)
  x = rng.uniform(-2, 2, (2, 224, 224, 3)).astype(np.float32)  # torchvision's normalised input
  ref = np_forward(
    torch_layers(sd, TORCHVISION_PREFIXES), x, pad1=2, groups=1, lrn=None, flatten="chw"
  )
  ours = apply(
    AlexNet(num_classes=10, variant="torchvision"), {"params": layouts.from_torchvision(sd)}, x
  )
  assert_logits_close(ours, ref)
  # With the std folded into conv1, the net takes pixels minus the mean in 0-255 units.
  folded = layouts.from_torchvision(sd, input_std=layouts.TORCHVISION_STD)
  pixels = x * np.asarray(layouts.TORCHVISION_STD, np.float32)
  assert_logits_close(
    apply(AlexNet(num_classes=10, variant="torchvision"), {"params": folded}, pixels), ref
  )


def test_caffe_npy_gives_the_numpy_reference_logits(tmp_path):
  """99x99 inputs give a 2x2 pool5, so fc6's HWC row order matters; LRN across all maps, k=1,
  alpha/n."""
  rng = np.random.default_rng(1)
  layers = random_caffe(rng, side=2, num_classes=5)
  path = str(tmp_path / "bvlc_alexnet.npy")
  np.save(path, layers, allow_pickle=True)  # how caffe-tensorflow writes it: a pickled dict
  bgr = rng.uniform(-120, 120, (2, 99, 99, 3)).astype(np.float32)
  ref = np_forward(
    {k: tuple(v) for k, v in layers.items()},
    bgr,
    pad1=0,
    groups=2,
    lrn=(1.0, 1e-4 / 5, 0.75, 1),
    flatten="hwc",
  )
  model = AlexNet(num_classes=5, **CAFFE_LRN)
  assert_logits_close(apply(model, {"params": layouts.from_caffe_npy(path)}, bgr), ref)
  rgb = bgr[..., ::-1]
  assert_logits_close(apply(model, {"params": layouts.from_caffe_npy(path, rgb=True)}, rgb), ref)
  # caffe-tensorflow's other form, {layer: {"weights", "biases"}}, reads the same.
  named = {k: {"weights": w, "biases": b} for k, (w, b) in layers.items()}
  np.testing.assert_array_equal(
    layouts.from_caffe(named)["fc6"]["kernel"], layouts.from_caffe(layers)["fc6"]["kernel"]
  )
  # The paper's per-tower LRN gives other numbers: the option matters.
  assert not np.allclose(
    apply(
      AlexNet(num_classes=5, lrn_k=1.0, lrn_alpha=2e-5), {"params": layouts.from_caffe(layers)}, bgr
    ),
    ref,
    rtol=1e-3,
  )


def test_grouped_export_gives_the_numpy_reference_logits():
  params = paper_params(99, num_classes=6)
  sd = layouts.to_torch_grouped(params)
  assert list(sd)[:2] == ["conv1.weight", "conv1.bias"] and sd["conv2.weight"].shape == (
    256,
    48,
    5,
    5,
  )
  x = np.random.default_rng(2).uniform(-120, 120, (2, 99, 99, 3)).astype(np.float32)
  ref = np_forward(
    torch_layers(sd, {n: n for n in LAYERS}),
    x,
    pad1=0,
    groups=2,
    lrn=(2.0, 1e-4, 0.75, 2),
    flatten="chw",
  )  # the paper's LRN: per tower, alpha not divided
  assert_logits_close(apply(AlexNet(num_classes=6), {"params": params}, x), ref)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.shape(x) == np.shape(y) and np.array_equal(x, y)


def test_round_trips_are_exact(torchvision_sd):
  rng, sd = np.random.default_rng(3), torchvision_sd
  ours = layouts.from_torchvision(sd)
  assert_trees_equal(layouts.to_torchvision(ours), sd)
  assert_trees_equal(layouts.from_torchvision(layouts.to_torchvision(ours)), ours)
  for towers in (None, 1):
    params = paper_params(99, num_classes=4, towers=towers)
    assert_trees_equal(layouts.from_torch_grouped(layouts.to_torch_grouped(params)), params)
  caffe = layouts.from_caffe(random_caffe(rng, side=2, num_classes=3))
  assert_trees_equal(layouts.from_torch_grouped(layouts.to_torch_grouped(caffe)), caffe)
  # Folding the input std into conv1 and out again is exact up to float rounding.
  back = layouts.to_torchvision(
    layouts.from_torchvision(sd, layouts.TORCHVISION_STD), layouts.TORCHVISION_STD
  )
  np.testing.assert_allclose(back["features.0.weight"], sd["features.0.weight"], rtol=1e-6)


@pytest.mark.parametrize(
  "suffix", [".npz", ".safetensors", pytest.param(".pth", marks=pytest.mark.slow)]
)
def test_state_dict_files_round_trip(tmp_path, suffix, torchvision_sd):
  if suffix == ".pth":
    need_torch()
  sd = torchvision_sd
  path = str(tmp_path / f"alexnet{suffix}")
  layouts.write_state_dict(sd, path)
  assert_trees_equal(layouts.read_state_dict(path), sd)
  params, fmt = layouts.read_pretrained(path)  # adapted to our pipeline: std folded into conv1
  assert fmt == "torchvision"
  assert_trees_equal(params, layouts.from_torchvision(sd, layouts.TORCHVISION_STD))


def test_lrn_across_all_maps_is_the_same_on_a_tower_mesh():
  x = jax.random.uniform(jax.random.key(1), (4, 67, 67, 3), maxval=100.0)
  model = AlexNet(
    num_classes=5, lrn_alpha=1e-2, lrn_scope="all"
  )  # a large alpha makes the tower edge count
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


# Bad input.


def test_missing_extra_and_misshaped_tensors_are_listed(torchvision_sd):
  sd = dict(torchvision_sd)
  del sd["features.0.bias"]
  sd["features.99.weight"] = np.zeros(3, np.float32)
  sd["classifier.4.weight"] = sd["classifier.4.weight"][:100]
  with pytest.raises(UserInputError) as e:
    layouts.from_torchvision(sd)
  message = str(e.value)
  assert "missing features.0.bias" in message and "extra features.99.weight" in message
  assert "classifier.4.weight (100, 4096) (expected (4096, 4096))" in message
  layers = random_caffe(np.random.default_rng(5), side=1, num_classes=3)
  layers["conv2"][0] = layers["conv2"][0][..., :128]
  with pytest.raises(
    UserInputError, match=r"conv2.weights \(5, 5, 48, 128\) \(expected \(5, 5, 48, 256\)\)"
  ):
    layouts.from_caffe(layers)
  with pytest.raises(UserInputError, match="'fc8' holds ndarray, not \\[weights, biases\\]"):
    layouts.from_caffe(layers | {"fc8": layers["fc8"][0]})
  with pytest.raises(UserInputError, match="not a 'torchvision' AlexNet"):
    layouts.to_torchvision(paper_params(67, 3))


def test_unknown_formats_are_named(tmp_path):
  path = str(tmp_path / "alexnet.bin")
  open(path, "wb").write(b"\0" * 8)
  with pytest.raises(UserInputError, match="unknown weights format '.bin'"):
    layouts.read_pretrained(path)
  npz = str(tmp_path / "other.npz")
  np.savez(npz, **{"layer1.weight": np.zeros(3)})
  with pytest.raises(UserInputError, match="neither torchvision's AlexNet keys"):
    layouts.read_pretrained(npz)
  plain = str(tmp_path / "plain.npy")
  np.save(plain, np.zeros((2, 3)))
  with pytest.raises(UserInputError, match="not Caffe's pickled"):
    layouts.from_caffe_npy(plain)
  with pytest.raises(UserInputError, match="is not a .npy file"):
    layouts.from_caffe_npy(path)
  truncated = str(tmp_path / "truncated.npy")
  np.save(truncated, {"conv1": [np.zeros(4, np.float32)]}, allow_pickle=True)
  open(truncated, "r+b").truncate(os.path.getsize(truncated) - 20)
  with pytest.raises(UserInputError, match="cannot read .*truncated.npy"):
    layouts.from_caffe_npy(truncated)
  corrupt = str(tmp_path / "corrupt.safetensors")
  open(corrupt, "wb").write(b"\x05" * 64)
  pytest.importorskip("safetensors")
  with pytest.raises(UserInputError, match="cannot read .* as safetensors"):
    layouts.read_state_dict(corrupt)


class _Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code(tmp_path):
  marker = tmp_path / "pwned"
  path = str(tmp_path / "bvlc_alexnet.npy")
  np.save(path, {"conv1": [_Exploit(marker), np.zeros(96, np.float32)]}, allow_pickle=True)
  with pytest.raises(
    UserInputError, match=r"refusing .*: its pickle calls (posix|os)\.system.*nothing was loaded"
  ):
    layouts.from_caffe_npy(path)
  assert not marker.exists()
  # The same file in a .npz (pickled arrays) is refused too.
  np.savez(str(tmp_path / "w.npz"), a=np.array([_Exploit(marker)], dtype=object))
  with pytest.raises(UserInputError, match="refusing"):
    layouts.read_state_dict(str(tmp_path / "w.npz"))
  assert not marker.exists()


def test_command_line_prints_one_line_errors(tmp_path):
  path = str(tmp_path / "bvlc_alexnet.npy")
  np.save(path, {"conv1": [_Exploit(tmp_path / "pwned"), 0]}, allow_pickle=True)
  run = subprocess.run(
    [sys.executable, "-m", "alexnet_jax.convert", f"--input={path}", f"--output={tmp_path / 'o'}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert run.returncode != 0
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith("error: refusing") and "Traceback" not in run.stderr
  assert not (tmp_path / "pwned").exists() and not (tmp_path / "o").exists()


def restore_train_state(workdir):
  """The whole TrainState of workdir's latest checkpoint, as `--mode=eval` and resuming restore
  it."""
  config = checkpoints.load_config(workdir)
  mesh = sharding.make_mesh(1)
  target = builders.abstract_state(
    builders.create_model(config, mesh),
    builders.create_optimizer(config, 1, 1),
    config.image_size,
    mesh,
  )
  mgr = checkpoints.manager(workdir, config.keep_checkpoints)
  state = checkpoints.restore(mgr, target)
  mgr.close()
  return config, state


@pytest.mark.slow
def test_import_writes_a_checkpoint_training_restores_and_export_reads_back(tmp_path):
  """A grouped paper net trained on 67x67 crops (quickstart's) out to PyTorch and back in."""
  params = paper_params(67, num_classes=10)
  source, workdir = str(tmp_path / "alexnet.npz"), str(tmp_path / "converted")
  layouts.write_state_dict(layouts.to_torch_grouped(params), source)
  published.import_weights(source, workdir)
  config, state = restore_train_state(workdir)
  assert (config.model.variant, config.model.towers, config.num_classes) == ("paper", 2, 10)
  assert config.image_size == 67 and config.init_from == source  # the size the weights' fc6 fits
  assert int(state.step) == 0
  assert_trees_equal(jax.tree.map(np.asarray, state.params), params)
  out = str(tmp_path / "back.npz")
  assert published.export_weights(workdir, out) == "torch_grouped"
  assert_trees_equal(layouts.read_state_dict(out), layouts.to_torch_grouped(params))
  with pytest.raises(UserInputError, match="already holds checkpoints"):
    published.import_weights(source, workdir)
  with pytest.raises(UserInputError, match="not --format=caffe"):
    published.import_weights(source, str(tmp_path / "other"), fmt="caffe")
  with pytest.raises(UserInputError, match="no checkpoint at step 5"):
    published.export_weights(workdir, out, step=5)


@pytest.mark.long  # real-size nets: 61M parameters, 224-pixel inputs
def test_torchvision_and_caffe_files_import_with_their_configs(tmp_path, torchvision_sd):
  source, workdir = str(tmp_path / "alexnet.safetensors"), str(tmp_path / "torchvision")
  layouts.write_state_dict(torchvision_sd, source)
  published.import_weights(source, workdir)
  config, state = restore_train_state(workdir)
  assert (config.model.variant, config.num_classes, config.image_size) == ("torchvision", 10, 224)
  assert tuple(config.channel_mean) == (123.675, 116.28, 103.53)
  assert_trees_equal(jax.tree.map(np.asarray, state.params), layouts.read_pretrained(source)[0])
  out = str(tmp_path / "back.pth" if importlib.util.find_spec("torch") else tmp_path / "back.npz")
  assert (
    published.export_weights(workdir, out) == "torchvision"
  )  # torchvision's std back out of conv1
  back = layouts.read_state_dict(out)
  for k in torchvision_sd:
    np.testing.assert_allclose(back[k], torchvision_sd[k], rtol=1e-6, atol=1e-8)
  source, workdir = str(tmp_path / "bvlc_alexnet.npy"), str(tmp_path / "caffe")
  np.save(
    source, random_caffe(np.random.default_rng(9), side=6, num_classes=1000), allow_pickle=True
  )
  published.import_weights(source, workdir)
  config, state = restore_train_state(workdir)
  assert (config.model.lrn_scope, config.model.lrn_k, config.image_size) == ("all", 1.0, 227)
  assert tuple(config.channel_mean) == pytest.approx(
    (122.68, 116.67, 104.01), abs=0.01
  )  # Caffe's, RGB
  assert_trees_equal(
    jax.tree.map(np.asarray, state.params), layouts.from_caffe_npy(source, rgb=True)
  )


# PyTorch itself: where it is installed, and always in CI (`need_torch`).


def import_torchvision():
  """torchvision, for its AlexNet (plain torch.nn). PyPI's torchvision 0.28 is built for
  CUDA's torch: beside the CPU torch, its C++ ops do not load, which torchvision allows for
  everywhere but in two fake kernels it registers on import (nms, qnms). Declared here, they
  let it import; AlexNet runs none of its ops."""
  torch = need_torch()
  try:
    return need_torch("torchvision")
  except RuntimeError as e:  # "operator torchvision::nms does not exist"
    if "torchvision::nms" not in str(e):
      raise
  for op in ("nms", "qnms"):
    torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou) -> Tensor")
  return need_torch("torchvision")


def test_torchvision_alexnet_gives_the_same_logits(torchvision_sd):
  """torchvision's own AlexNet runs our export (every key and shape: loaded strictly) to our
  logits. Import is its exact inverse (test_round_trips_are_exact)."""
  torch, torchvision = need_torch(), import_torchvision()
  params = layouts.from_torchvision(torchvision_sd)
  net = torchvision.models.alexnet(weights=None, num_classes=10).eval()
  net.load_state_dict({k: torch.from_numpy(v) for k, v in layouts.to_torchvision(params).items()})
  x = np.random.default_rng(7).normal(size=(4, 3, 224, 224)).astype(np.float32)
  with torch.no_grad():
    ref = net(torch.from_numpy(x)).numpy()
  ours = apply(
    AlexNet(num_classes=10, variant="torchvision"), {"params": params}, x.transpose(0, 2, 3, 1)
  )
  assert_close(ours, ref, rtol=1e-4)  # PyTorch's kernels against XLA's


def test_grouped_export_gives_pytorchs_logits():
  """The paper's net exported with groups=2 into `torch_nets.GroupedAlexNet` (torchvision has
  no grouped AlexNet; the benchmark's PyTorch baseline is this net)."""
  torch = need_torch()
  from alexnet_jax.weights import torch_nets

  params = paper_params(99, num_classes=10)  # pool5 2x2: fc6's CHW order matters
  grouped = torch_nets.GroupedAlexNet(num_classes=10, pool5_side=2).eval()
  grouped.load_state_dict(
    {k: torch.from_numpy(v) for k, v in layouts.to_torch_grouped(params).items()}
  )
  x = np.random.default_rng(8).uniform(-120, 120, (4, 99, 99, 3)).astype(np.float32)
  with torch.no_grad():
    ref = grouped(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  assert_close(apply(AlexNet(num_classes=10), {"params": params}, x), ref, rtol=1e-4)


def test_torch_pth_is_read_with_weights_only(tmp_path):
  torch = need_torch()
  path = str(tmp_path / "evil.pth")
  torch.save({"features.0.weight": torch.zeros(1), "x": _Exploit(tmp_path / "pwned")}, path)
  with pytest.raises(UserInputError, match="weights_only=True"):
    layouts.read_state_dict(path)
  assert not (tmp_path / "pwned").exists()
