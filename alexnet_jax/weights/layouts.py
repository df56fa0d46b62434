"""Weight layouts: published AlexNet weights as our parameters, and ours as PyTorch's (numpy only).

Our layout (model/alexnet.py): tower layers lead with a tower axis; conv kernels are HWIO,
fully connected kernels (in, out); fc6 reads pool5 flattened tower by tower in HWC order. The
layouts converted here:

- "torchvision": torchvision's AlexNet state dict (features.0.weight ... classifier.6.bias):
  OIHW kernels, (out, in) weights, fc6 reading pool5 flattened in CHW order. Into and
  from `variant="torchvision"`.
- "torch_grouped": the paper's net in PyTorch with groups=2 in conv2, conv4 and conv5
  (`torch_nets.GroupedAlexNet`): keys conv1.weight, conv1.bias ... fc8.bias, otherwise as
  torchvision. Into and from `variant="paper"`.
- "caffe": Caffe's bvlc_alexnet in caffe-tensorflow's .npy form, a pickled dict
  {layer: [weights, biases]}: HWIO kernels (conv2/4/5 grouped), (in, out) weights with
  fc6's rows in HWC order over all 256 maps, BGR input. Into `variant="paper"` with
  Caffe's LRN (training/recipes.py). Read without running any pickled code (readers.py).

The functions below change the layout only, exactly: the net then wants the input of its
home framework (torchvision: (pixels / 255 - mean) / std; Caffe: BGR pixels - mean) unless
`input_std` or `rgb` adapt conv1 to our pipeline's (RGB pixels in 0-255 minus the mean),
as `read_pretrained`, `python -m alexnet_jax.convert` and `--config.init_from` do.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from alexnet_jax.core.errors import UserInputError
from alexnet_jax.model.alexnet import LAYERS, make_arch, param_shapes
from alexnet_jax.weights import readers

Params = dict[str, dict[str, np.ndarray]]
FORMATS = ("torchvision", "torch_grouped", "caffe")
# torchvision divides (pixels / 255 - mean) by std = (0.229, 0.224, 0.225); in 0-255 units:
TORCHVISION_STD = (58.395, 57.12, 57.375)
_FLOATS = ("float16", "bfloat16", "float32", "float64")  # the dtypes weights may come in
_TORCHVISION_KEYS = dict(
  zip(
    LAYERS,
    (
      "features.0",
      "features.3",
      "features.6",
      "features.8",
      "features.10",
      "classifier.1",
      "classifier.4",
      "classifier.6",
    ),
  )
)


# Layouts. "Merged": one (kernel, bias) per layer with the towers' outputs side by side,
# tower 0 first (Caffe's groups): HWIO kernels and (in, out) weights, our fc6 row order.


def _merge(params: Mapping) -> tuple[dict, int]:
  towers = np.shape(params["conv1"]["kernel"])[0]
  merged = {}
  for name in LAYERS:
    k, b = (np.asarray(params[name][p], np.float32) for p in ("kernel", "bias"))
    merged[name] = (k, b) if name == "fc8" else (np.concatenate(list(k), axis=-1), b.reshape(-1))
  return merged, towers


def _split(merged: dict, towers: int) -> Params:
  params = {}
  for name in LAYERS:
    k, b = merged[name]
    params[name] = (
      {"kernel": k, "bias": b}
      if name == "fc8"
      else {"kernel": np.stack(np.split(k, towers, axis=-1)), "bias": b.reshape(towers, -1)}
    )
  return params


def _fc6_rows(towers: int, width: int, side: int, order: str) -> np.ndarray:
  """For each of our fc6 input rows (tower, h, w, channel in the tower), its row in the
  flattening `order` ("chw" or "hwc") of pool5's towers * width maps."""
  if order == "chw":
    rows = (
      np.arange(towers * width * side * side)
      .reshape(towers, width, side, side)
      .transpose(0, 2, 3, 1)
    )
  else:
    rows = (
      np.arange(side * side * towers * width)
      .reshape(side, side, towers, width)
      .transpose(2, 0, 1, 3)
    )
  return rows.reshape(-1)


def _keys(fmt: str) -> dict[str, tuple[str, str]]:
  """Each layer's (weight key, bias key) in `fmt`."""
  if fmt == "caffe":
    return {name: (f"{name}.weights", f"{name}.biases") for name in LAYERS}
  prefix = _TORCHVISION_KEYS if fmt == "torchvision" else {name: name for name in LAYERS}
  return {name: (f"{prefix[name]}.weight", f"{prefix[name]}.bias") for name in LAYERS}


def _expected(fmt: str, towers: int, num_classes: int, side: int) -> dict[str, tuple]:
  """The shape of every tensor of `fmt` for a net of these dimensions."""
  variant = "torchvision" if fmt == "torchvision" else "paper"
  shapes = param_shapes(make_arch(variant, towers), num_classes, side)
  expected = {}
  for name, (wkey, bkey) in _keys(fmt).items():
    kshape, bshape = shapes[name]
    if name != "fc8":  # merge the tower axis into the outputs
      kshape, bshape = kshape[1:-1] + (kshape[0] * kshape[-1],), (math.prod(bshape),)
    expected[wkey] = kshape if fmt == "caffe" else (kshape[-1], kshape[-2]) + kshape[:-2]
    expected[bkey] = bshape
  return expected


def _towers(shapes: Mapping[str, tuple], fmt: str) -> int:
  """The towers of the net a layout's tensors hold: the grouped net's follow conv2's groups."""
  if fmt != "torch_grouped":
    return 2 if fmt == "caffe" else 1
  try:
    towers = shapes["conv1.weight"][0] // shapes["conv2.weight"][1]
  except (KeyError, IndexError, ZeroDivisionError):
    towers = 2  # the shape check names what is wrong
  return towers if towers in (1, 2) else 2


def _dimensions(shapes: Mapping[str, tuple], fmt: str, towers: int) -> tuple[int, int]:
  """(num_classes, pool5 side) of the net the tensors claim to be, for the shape check."""
  bias = shapes.get(_keys(fmt)["fc8"][1], ())
  num_classes = bias[0] if len(bias) == 1 else 1000
  if fmt == "torchvision":
    return num_classes, 6
  fc6 = shapes.get(_keys(fmt)["fc6"][0], ())
  maps = towers * make_arch("paper", towers).conv_widths[-1]
  fan_in = fc6[0 if fmt == "caffe" else -1] if len(fc6) == 2 else 0
  side = math.isqrt(fan_in // maps)
  return num_classes, side if side and side * side * maps == fan_in else 6


def _check(shapes: Mapping[str, tuple], expected: dict[str, tuple], what: str) -> None:
  """A clear error listing every missing, extra and mis-shaped tensor."""
  missing = [k for k in expected if k not in shapes]
  extra = sorted(k for k in shapes if k not in expected)
  wrong = [
    f"{k} {shapes[k]} (expected {expected[k]})"
    for k in expected
    if k in shapes and shapes[k] != expected[k]
  ]
  problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
    [f"extra {', '.join(extra)}"] if extra else []
  )
  problems += [f"mis-shaped {', '.join(wrong)}"] if wrong else []
  if problems:
    raise UserInputError(f"{what} does not match the AlexNet it should hold: {'; '.join(problems)}")


def _check_layout(shapes: Mapping[str, tuple], fmt: str, what: str) -> int:
  """Refuses tensors that are not exactly those of an AlexNet in `fmt`; returns its towers."""
  towers = _towers(shapes, fmt)
  num_classes, side = _dimensions(shapes, fmt, towers)
  _check(shapes, _expected(fmt, towers, num_classes, side), what)
  return towers


def check_finite(tensors: Mapping[str, Any], what: str) -> None:
  """Refuses weights holding NaN or Inf (a diverged run's): imported, they would train or
  predict nothing without a word."""
  bad = [k for k, v in tensors.items() if not np.isfinite(v).all()]
  if bad:
    raise UserInputError(
      f"refusing {what}: NaN or Inf values in {', '.join(bad)}; take the weights from a file "
      "or checkpoint saved before they went bad"
    )


def _import(tensors: Mapping, fmt: str) -> Params:
  what = f"the {fmt} weights"
  towers = _check_layout({k: tuple(np.shape(v)) for k, v in tensors.items()}, fmt, what)
  check_finite(tensors, what)
  merged = {}
  for name, keys in _keys(fmt).items():
    w, b = (np.asarray(tensors[k], np.float32) for k in keys)
    if fmt != "caffe":  # OIHW -> HWIO, (out, in) -> (in, out)
      w = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T
    merged[name] = (w, b)
  width = merged["conv5"][0].shape[-1] // towers
  side = math.isqrt(merged["fc6"][0].shape[0] // (towers * width))
  rows = _fc6_rows(towers, width, side, "hwc" if fmt == "caffe" else "chw")
  merged["fc6"] = (merged["fc6"][0][rows], merged["fc6"][1])
  return _split(merged, towers)


def _export(params: Mapping, fmt: str) -> dict[str, np.ndarray]:
  merged, towers = _merge(params)
  variant = "torchvision" if fmt == "torchvision" else "paper"
  try:  # the variant's own tower counts
    arch = make_arch(variant, towers)
  except ValueError:
    raise UserInputError(
      f"the parameters have {towers} tower(s): not a {variant!r} AlexNet, so not {fmt} weights"
    ) from None
  width = merged["conv5"][0].shape[-1] // towers
  fan_in = merged["fc6"][0].shape[0]
  side = math.isqrt(fan_in // (towers * width))
  ours = {f"{name}/{p}": params[name][p] for name in LAYERS for p in ("kernel", "bias")}
  shapes = param_shapes(arch, np.shape(params["fc8"]["bias"])[0], side)
  _check(
    {k: tuple(np.shape(v)) for k, v in ours.items()},
    {f"{n}/{p}": s for n, (k, b) in shapes.items() for p, s in (("kernel", k), ("bias", b))},
    f"the parameters to export as {fmt}",
  )
  theirs = np.empty_like(merged["fc6"][0])
  theirs[_fc6_rows(towers, width, side, "chw")] = merged["fc6"][0]
  merged["fc6"] = (theirs, merged["fc6"][1])
  out = {}
  for name, (wkey, bkey) in _keys(fmt).items():
    w, b = merged[name]
    # writable copies
    out[wkey] = np.array(w.transpose(3, 2, 0, 1) if w.ndim == 4 else w.T, order="C")
    out[bkey] = np.array(b)
  return out


def _scale_conv1(params: Params, factors: Sequence[float]) -> Params:
  """conv1's kernel times a factor per input channel: a net for inputs divided by them."""
  kernel = params["conv1"]["kernel"] * np.asarray(factors, np.float32)[:, None]
  return params | {"conv1": {"kernel": kernel.astype(np.float32), "bias": params["conv1"]["bias"]}}


# The public conversions.


def from_torchvision(
  state_dict: Mapping[str, Any], input_std: Sequence[float] | None = None
) -> Params:
  """torchvision's AlexNet state dict as `AlexNet(variant="torchvision")` parameters.

  input_std: torchvision's per-channel input std in the units of the images the net will
  get; conv1 absorbs it, so the net takes (pixels - mean) rather than (pixels - mean) / std.
  TORCHVISION_STD fits our pipeline (0-255 pixels minus the mean).
  """
  params = _import(state_dict, "torchvision")
  return (
    params if input_std is None else _scale_conv1(params, 1.0 / np.asarray(input_std, np.float64))
  )


def to_torchvision(
  params: Mapping, input_std: Sequence[float] | None = None
) -> dict[str, np.ndarray]:
  """`variant="torchvision"` parameters as torchvision's state dict (numpy arrays); the
  inverse of `from_torchvision` with the same `input_std`."""
  params = {name: dict(layer) for name, layer in params.items()}
  return _export(params if input_std is None else _scale_conv1(params, input_std), "torchvision")


def from_torch_grouped(state_dict: Mapping[str, Any]) -> Params:
  """The state dict of `torch_nets.GroupedAlexNet` (`to_torch_grouped`'s) as `variant="paper"`
  parameters; the towers follow conv2's groups."""
  return _import(state_dict, "torch_grouped")


def to_torch_grouped(params: Mapping) -> dict[str, np.ndarray]:
  """`variant="paper"` parameters as the state dict of the same net in PyTorch, with
  groups=2 in conv2, conv4 and conv5 (`torch_nets.GroupedAlexNet`): keys conv1.weight,
  conv1.bias ... fc8.bias, OIHW kernels, (out, in) weights, fc6 reading CHW. The input
  stays ours: RGB pixels in 0-255 minus the mean."""
  return _export(params, "torch_grouped")


def from_caffe(layers: Mapping[str, Any], rgb: bool = False) -> Params:
  """Caffe's bvlc_alexnet as caffe-tensorflow's dict ({layer: [weights, biases]} or
  {layer: {"weights", "biases"}}) as `variant="paper"` parameters; run them with Caffe's LRN
  (lrn_scope="all", lrn_k=1, lrn_alpha=2e-5). rgb: reorder conv1's inputs so the net takes
  RGB instead of Caffe's BGR (exact: the same sum in another order)."""
  tensors = {}
  for name, value in layers.items():
    if isinstance(value, Mapping):
      value = [value.get("weights"), value.get("biases")]
    if not isinstance(value, (list, tuple)) or len(value) != 2:
      raise UserInputError(
        f"Caffe layer {name!r} holds {type(value).__name__}, not [weights, biases]"
      )
    tensors[f"{name}.weights"], tensors[f"{name}.biases"] = value
  params = _import(tensors, "caffe")
  if rgb:
    params["conv1"]["kernel"] = np.ascontiguousarray(params["conv1"]["kernel"][..., ::-1, :])
  return params


def from_caffe_npy(path: str, rgb: bool = False) -> Params:
  """`from_caffe` of a bvlc_alexnet.npy file, read without running any pickled code."""
  return from_caffe(readers.read_caffe_npy(path), rgb=rgb)


def state_dict_format(tensors: Mapping, path: str) -> str:
  """Which PyTorch layout a state dict holds, by its keys."""
  if _keys("torchvision")["conv1"][0] in tensors:
    return "torchvision"
  if _keys("torch_grouped")["conv1"][0] in tensors:
    return "torch_grouped"
  raise UserInputError(
    f"{path} has neither torchvision's AlexNet keys (features.0.weight, ...) nor the grouped "
    f"net's (conv1.weight, ...); its keys start {sorted(tensors)[:4]}"
  )


def _check_declared(declared: Mapping[str, readers.Declared], path: str) -> None:
  """A state dict file's tensors, as its headers declare them, checked against the layout
  their names say before any is read: a small file declaring huge tensors reads nothing."""
  fmt = state_dict_format(declared, path)
  _check_layout({k: d.shape for k, d in declared.items()}, fmt, f"{path} ({fmt} weights)")
  other = [f"{k} {d.dtype}" for k, d in declared.items() if d.dtype not in _FLOATS]
  if other:
    raise UserInputError(f"{path} holds tensors that are not floating point: {', '.join(other)}")


def read_pretrained(path: str) -> tuple[Params, str]:
  """A weights file as (parameters, format), adapted to our input pipeline: RGB pixels in
  0-255 minus the mean (conv1 absorbs torchvision's std and Caffe's BGR order). Files with
  other tensors than the layout's, or with NaN or Inf, are refused."""
  if os.path.splitext(path)[1].lower() == ".npy":
    return from_caffe_npy(path, rgb=True), "caffe"
  tensors = readers.read_state_dict(path, lambda declared: _check_declared(declared, path))
  fmt = state_dict_format(tensors, path)
  if fmt == "torchvision":
    return from_torchvision(tensors, input_std=TORCHVISION_STD), fmt
  return from_torch_grouped(tensors), fmt
