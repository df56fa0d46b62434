"""Published layouts to ours and back: numpy reference forward passes written from each
framework's definition, exact round trips, every bad tensor named, and PyTorch and torchvision
themselves (required in CI)."""

import numpy as np
import pytest
from conftest import (
  TORCHVISION_SHAPES,
  apply,
  assert_close,
  assert_trees_equal,
  need_torch,
  paper_params,
  random_caffe,
)
from numpy.lib.stride_tricks import sliding_window_view

from alexnet_jax.core.errors import UserInputError
from alexnet_jax.model import settings
from alexnet_jax.model.alexnet import LAYERS, AlexNet
from alexnet_jax.training import recipes
from alexnet_jax.weights import layouts

# A numpy forward pass written from the frameworks' definitions: NHWC, HWIO, float64.


def np_conv(x, w, b, stride, pad, groups):
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  # n, oh, ow, c, kh, kw
  win = sliding_window_view(x, w.shape[:2], axis=(1, 2))[:, ::stride, ::stride]
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


def published_net(fmt, num_classes):
  """The net the package runs `fmt`'s weights in: the settings they were trained with."""
  return AlexNet(num_classes=num_classes, **settings.alexnet_fields(recipes.trained_with(fmt)))


def assert_logits_close(ours, ref):
  """Ours in float32 against the float64 reference: float32 rounding over eight layers."""
  assert_close(ours, ref, rtol=1e-4)


def test_torchvision_state_dict_gives_the_numpy_reference_logits(torchvision_sd):
  sd, rng = torchvision_sd, np.random.default_rng(0)
  x = rng.uniform(-2, 2, (2, 224, 224, 3)).astype(np.float32)  # torchvision's normalised input
  ref = np_forward(
    torch_layers(sd, TORCHVISION_PREFIXES), x, pad1=2, groups=1, lrn=None, flatten="chw"
  )
  net = published_net("torchvision", 10)
  assert_logits_close(apply(net, {"params": layouts.from_torchvision(sd)}, x), ref)
  # With the std folded into conv1, the net takes pixels minus the mean in 0-255 units.
  folded = layouts.from_torchvision(sd, input_std=layouts.TORCHVISION_STD)
  pixels = x * np.asarray(layouts.TORCHVISION_STD, np.float32)
  assert_logits_close(apply(net, {"params": folded}, pixels), ref)


def test_caffe_npy_gives_the_numpy_reference_logits(tmp_path):
  """99x99 inputs give a 2x2 pool5, so fc6's HWC row order matters; Caffe's LRN (across all
  maps, k=1, alpha/n) is the package's Caffe settings."""
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
  model = published_net("caffe", 5)
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
  assert list(sd)[:2] == ["conv1.weight", "conv1.bias"]
  assert sd["conv2.weight"].shape == (256, 48, 5, 5)
  x = np.random.default_rng(2).uniform(-120, 120, (2, 99, 99, 3)).astype(np.float32)
  # The paper's LRN: per tower, alpha not divided.
  ref = np_forward(
    torch_layers(sd, {n: n for n in LAYERS}),
    x,
    pad1=0,
    groups=2,
    lrn=(2.0, 1e-4, 0.75, 2),
    flatten="chw",
  )
  assert_logits_close(apply(AlexNet(num_classes=6), {"params": params}, x), ref)


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
  ours = apply(published_net("torchvision", 10), {"params": params}, x.transpose(0, 2, 3, 1))
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


def test_nonfinite_weights_are_refused_with_their_names(tmp_path, torchvision_sd):
  """A diverged run's weights, in any layout: one line naming each bad tensor."""
  sd = dict(torchvision_sd)
  sd["features.3.weight"] = sd["features.3.weight"].copy()
  sd["features.3.weight"][0, 0, 0, 0] = np.nan
  sd["classifier.6.bias"] = np.full_like(sd["classifier.6.bias"], np.inf)
  path = str(tmp_path / "diverged.npz")
  np.savez(path, **sd)
  with pytest.raises(
    UserInputError,
    match=r"^refusing the torchvision weights: NaN or Inf values in features.3.weight, "
    r"classifier.6.bias; take the weights",
  ):
    layouts.read_pretrained(path)
  layers = random_caffe(np.random.default_rng(6), side=1, num_classes=3)
  layers["fc7"][1][2] = -np.inf
  np.save(str(tmp_path / "bvlc_alexnet.npy"), layers, allow_pickle=True)
  with pytest.raises(UserInputError, match="NaN or Inf values in fc7.biases;"):
    layouts.read_pretrained(str(tmp_path / "bvlc_alexnet.npy"))
