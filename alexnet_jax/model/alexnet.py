"""AlexNet as in the paper (two towers) and as in torchvision (one tower).

Every tower-split parameter carries a leading tower axis of size `towers`. Under a
`('data', 'model')` mesh the forward pass runs in `jax.shard_map`: each device holds its
own towers' parameters and activations and computes one plain convolution per tower;
activations cross devices only where the paper's two GPUs talked, before conv3 and at
the fully connected layers. Without a mesh the same function loops over the towers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from alexnet_jax.model import ops

CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")
FC_LAYERS = ("fc6", "fc7")
TOWER_LAYERS = CONV_LAYERS + FC_LAYERS
LAYERS = TOWER_LAYERS + ("fc8",)  # the eight learned layers, input to output
# (kernel size, stride, padding) of each conv; conv1's padding comes from the Arch.
_CONV_GEOMETRY = {
  "conv1": (11, 4, None),
  "conv2": (5, 1, 2),
  "conv3": (3, 1, 1),
  "conv4": (3, 1, 1),
  "conv5": (3, 1, 1),
}
_POOLED = ("conv1", "conv2", "conv5")
_LRN_LAYERS = ("conv1", "conv2")
VARIANTS = ("paper", "torchvision")
LRN_SCOPES = ("tower", "all")
# (max pooling, LRN) of each `ops_impl`: "fast" has hand-written gradients (1.2x on the CPU
# train step, benchmarks/RESULTS.md); "plain" is XLA's reduce_window pooling and JAX's own
# gradients, the reference the fast ops are tested against.
OPS_IMPLS = {
  "fast": (ops.max_pool, ops.lrn),
  "plain": (ops.max_pool_reduce_window, ops.lrn_autodiff),
}
ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh}


@dataclasses.dataclass(frozen=True)
class Arch:
  """The shape of one variant: widths are per tower."""

  towers: int
  conv_widths: tuple[int, ...]
  fc_widths: tuple[int, int]
  conv1_padding: int
  lrn: bool
  adaptive_pool: int  # output side of torchvision's adaptive average pool; 0 = none
  dropout_on: tuple[str, str]  # tower outputs that dropout is applied to
  cross_tower: tuple[str, ...]  # layers that read every tower's previous output
  init: str  # "paper": N(0, std) and constant biases; "torch": PyTorch's default


def make_arch(variant: str, towers: int | None = None, lrn: bool | None = None) -> Arch:
  """The variant's architecture with the paper's ablations applied."""
  if variant == "paper":
    towers = 2 if towers is None else towers
    if towers == 2:
      convs, fcs = (48, 128, 192, 192, 128), (2048, 2048)
    elif towers == 1:
      # The paper's one-GPU comparison net (§3.2, footnote): half the kernels in conv1-4,
      # but conv5 and the fully connected layers keep their full size.
      convs, fcs = (48, 128, 192, 192, 256), (4096, 4096)
    else:
      raise ValueError(f"towers={towers} is not supported; the paper variant has 1 or 2 towers")
    return Arch(
      towers,
      convs,
      fcs,
      conv1_padding=0,
      lrn=True if lrn is None else lrn,
      adaptive_pool=0,
      dropout_on=("fc6", "fc7"),
      cross_tower=("conv3", "fc6", "fc7") if towers == 2 else (),
      init="paper",
    )
  if variant == "torchvision":
    if towers not in (None, 1):
      raise ValueError(f"towers={towers} is not supported; the torchvision variant has 1 tower")
    return Arch(
      1,
      (64, 192, 384, 256, 256),
      (4096, 4096),
      conv1_padding=2,
      lrn=bool(lrn),
      adaptive_pool=6,
      dropout_on=("pool5", "fc6"),
      cross_tower=(),
      init="torch",
    )
  raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")


def check_model_axis(size: int, towers: int | None = None) -> None:
  """The one rule for the mesh's `model` axis, whoever sets it (the mesh, the config, the net):
  1 (towers together) or 2 (one tower per device, the paper's two GPUs), splitting `towers`."""
  if size not in (1, 2):
    raise ValueError(
      f"the model axis has size {size}; it must be 1 (towers together) or 2 "
      "(one tower per device, as in the paper)"
    )
  if towers is not None and towers % size:
    raise ValueError(f"a net of {towers} tower(s) cannot be split over a model axis of size {size}")


def pool_geometry(overlapping: bool) -> tuple[int, int]:
  """(window, stride) of the max pooling: the paper's overlapping 3x3 stride 2 (§3.4), or 2x2."""
  return (3, 2) if overlapping else (2, 2)


def feature_sides(arch: Arch, side: int, pool_window: int, pool_stride: int) -> dict[str, int]:
  """Spatial side of each conv output and of pool5, or a clear error if the input is too small."""
  sides, s = {}, side
  for name in CONV_LAYERS:
    k, stride, pad = _CONV_GEOMETRY[name]
    pad = arch.conv1_padding if pad is None else pad
    s = (s + 2 * pad - k) // stride + 1
    sides[name] = s
    if name in _POOLED:
      s = (s - pool_window) // pool_stride + 1
    if s < 1:
      raise ValueError(
        f"image side {side} is too small for AlexNet: the maps vanish after {name}; "
        "use images of at least 67 pixels"
      )
  sides["pool5"] = arch.adaptive_pool or s
  return sides


def param_shapes(arch: Arch, num_classes: int, pool5_side: int) -> dict[str, tuple[tuple, tuple]]:
  """(kernel shape, bias shape) of every layer; tower layers lead with the tower axis."""
  t, width_in, shapes = arch.towers, 3, {}
  for name, width in zip(CONV_LAYERS, arch.conv_widths):
    k = _CONV_GEOMETRY[name][0]
    cin = width_in * t if name in arch.cross_tower else width_in
    shapes[name] = ((t, k, k, cin, width), (t, width))
    width_in = width
  width_in = pool5_side**2 * width_in
  for name, width in zip(FC_LAYERS, arch.fc_widths):
    cin = width_in * t if name in arch.cross_tower else width_in
    shapes[name] = ((t, cin, width), (t, width))
    width_in = width
  shapes["fc8"] = ((width_in * t, num_classes), (num_classes,))
  return shapes


def merge_towers(a: jax.Array) -> jax.Array:
  """(towers, batch, ..., C) -> (batch, ..., towers * C): tower 0's channels first, as Caffe
  groups."""
  a = jnp.moveaxis(a, 0, -2)
  return a.reshape(a.shape[:-2] + (-1,))


def tower_forward(
  params: dict,
  x: jax.Array,
  masks: dict,
  *,
  arch: Arch,
  act: Callable,
  lrn_args: dict,
  pool: tuple[int, int],
  dtype: Any,
  keep_rate: float,
  axis: str | None,
  capture: bool,
  lrn_scope: str = "tower",
  max_pool: Callable = ops.max_pool,
  lrn: Callable = ops.lrn,
) -> tuple[jax.Array, dict]:
  """The towers of the net on this device, up to fc7.

  `params` leaves carry a leading axis of the towers held here; `axis` names the mesh axis
  the other towers live on (None: all towers are local). Returns fc7 of the local towers
  concatenated on the feature axis, and, when `capture`, every named activation stacked
  as (local towers, batch, ...). `lrn_scope` "all" normalises across every tower's maps
  (Caffe's one-GPU net) instead of within each tower (the paper's GPUs).
  """
  n_local = params["conv1"]["kernel"].shape[0]
  feats = {}

  def gather(hs):
    h = jnp.stack(hs)
    if axis is not None:
      h = jax.lax.all_gather(h, axis, axis=0, tiled=True)
    return jnp.concatenate(list(h), axis=-1)

  def normalise(hs):
    if lrn_scope == "tower":
      return [lrn(h, **lrn_args) for h in hs]
    whole = lrn(gather(hs), **lrn_args)  # every tower's maps; then each keeps its own slice
    width = hs[0].shape[-1]
    first = 0 if axis is None else jax.lax.axis_index(axis) * n_local
    return [
      jax.lax.dynamic_slice_in_dim(whole, (first + t) * width, width, axis=-1)
      for t in range(n_local)
    ]

  def record(name, hs):
    if capture:
      feats[name] = jnp.stack(hs)

  def dropout(name, hs):
    if name not in masks:
      return hs
    return [jnp.where(masks[name][t], h / keep_rate, 0).astype(h.dtype) for t, h in enumerate(hs)]

  hs = [x.astype(dtype)] * n_local
  for name in CONV_LAYERS:
    with jax.named_scope(name):
      if name in arch.cross_tower:
        hs = [gather(hs)] * n_local
      k, stride, pad = _CONV_GEOMETRY[name]
      pad = arch.conv1_padding if pad is None else pad
      kern, bias = params[name]["kernel"].astype(dtype), params[name]["bias"].astype(dtype)
      hs = [act(ops.conv2d(h, kern[t], bias[t], stride, pad)) for t, h in enumerate(hs)]
      record(name, hs)
      if arch.lrn and name in _LRN_LAYERS:
        hs = normalise(hs)
      if name in _POOLED:
        hs = [max_pool(h, *pool) for h in hs]
  with jax.named_scope("pool5"):
    if arch.adaptive_pool:
      hs = [ops.adaptive_avg_pool(h, arch.adaptive_pool) for h in hs]
    record("pool5", hs)
    hs = dropout("pool5", [h.reshape(h.shape[0], -1) for h in hs])
  for name in FC_LAYERS:
    with jax.named_scope(name):
      if name in arch.cross_tower:
        hs = [gather(hs)] * n_local
      kern, bias = params[name]["kernel"].astype(dtype), params[name]["bias"].astype(dtype)
      # One product batched over the local towers: slicing out kern[t] would copy each
      # tower's kernel (fc6's is 75 MB) in the forward pass and again in the backward pass.
      hs = list(act(jnp.einsum("tbi,tio->tbo", jnp.stack(hs), kern) + bias[:, None]))
      record(name, hs)
      hs = dropout(name, hs)
  return jnp.concatenate(hs, axis=-1), feats


class _LayerParams(nn.Module):
  """Creates one layer's kernel and bias (the forward pass is a pure function of them)."""

  kernel_shape: tuple[int, ...]
  bias_shape: tuple[int, ...]
  kernel_init: Callable
  bias_init: Callable

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    return (
      self.param("kernel", self.kernel_init, self.kernel_shape, jnp.float32),
      self.param("bias", self.bias_init, self.bias_shape, jnp.float32),
    )


def _uniform(bound: float) -> Callable:
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


class AlexNet(nn.Module):
  """AlexNet; `model.apply(variables, images, train=False)` gives float32 logits.

  images: NHWC float32, 227x227 for the paper's maps (the paper's "224" is an erratum:
  (224 - 11) / 4 + 1 is not an integer; 227 gives the 55x55 maps of its Figure 2); any side
  of at least 67 works. Named activations (conv1..conv5 after their ReLU, pool5, fc6, fc7,
  logits) come from the same pass when `intermediates` is mutable:
  `_, s = model.apply(v, x, mutable=["intermediates"])`; `s["intermediates"]["features"]["fc7"]`
  is the 4096-d feature.
  """

  num_classes: int = 1000
  variant: str = "paper"
  mesh: Mesh | None = None
  towers: int | None = None  # paper: 2 (the paper's net) or 1 (its one-GPU comparison net)
  activation: str = "relu"
  lrn: bool | None = None  # None: the variant's own choice
  overlapping_pool: bool = True  # 3x3 stride 2 (the paper) or 2x2 stride 2
  dropout_rate: float = 0.5
  init_std: float = 0.01  # std of the N(0, std) weights
  bias_one: float = 1.0  # the biases the paper sets to 1 (Caffe used 0.1)
  lrn_k: float = 2.0
  lrn_n: int = 5
  lrn_alpha: float = 1e-4  # NOT divided by n, as in the paper
  lrn_beta: float = 0.75
  # "tower": within each tower (the paper) | "all": across all maps (Caffe)
  lrn_scope: str = "tower"
  dtype: Any = jnp.float32  # computation dtype; parameters stay float32
  ops_impl: str = "fast"  # "fast" or "plain": see OPS_IMPLS

  def __post_init__(self):
    make_arch(self.variant, self.towers, self.lrn)
    if self.activation not in ACTIVATIONS:
      raise ValueError(
        f"unknown activation {self.activation!r}; choose one of {tuple(ACTIVATIONS)}"
      )
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"dropout_rate={self.dropout_rate} must be in [0, 1)")
    if self.lrn_scope not in LRN_SCOPES:
      raise ValueError(f"unknown lrn_scope {self.lrn_scope!r}; choose one of {LRN_SCOPES}")
    if self.ops_impl not in OPS_IMPLS:
      raise ValueError(f"unknown ops_impl {self.ops_impl!r}; choose one of {tuple(OPS_IMPLS)}")
    if self.mesh is not None:
      self._check_mesh()
    super().__post_init__()

  def _check_mesh(self):
    if tuple(self.mesh.axis_names) != ("data", "model"):
      raise ValueError(
        f"mesh axes are {self.mesh.axis_names}; AlexNet needs ('data', 'model') "
        "(build one with alexnet_jax.model.sharding.make_mesh)"
      )
    check_model_axis(self.mesh.shape["model"], self.arch.towers)

  @property
  def arch(self) -> Arch:
    return make_arch(self.variant, self.towers, self.lrn)

  def _layer(self, name: str, kernel_shape: tuple, bias_shape: tuple, bias_value: float):
    arch = self.arch
    if arch.init == "paper":
      kinit, binit = nn.initializers.normal(self.init_std), nn.initializers.constant(bias_value)
    else:  # PyTorch's default: U(+-1/sqrt(fan_in)) for weights and biases
      fan_in = math.prod(kernel_shape[1:-1]) if len(kernel_shape) > 2 else kernel_shape[0]
      kinit = binit = _uniform(fan_in**-0.5)
    return _LayerParams(kernel_shape, bias_shape, kinit, binit, name=name)()

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(
        f"images have shape {images.shape}; AlexNet wants NHWC with 3 channels, "
        "e.g. (batch, 227, 227, 3)"
      )
    batch = images.shape[0]
    if self.mesh is not None and batch % self.mesh.shape["data"]:
      raise ValueError(
        f"batch {batch} does not divide over the mesh's data axis of size "
        f"{self.mesh.shape['data']}; use a multiple of it"
      )
    arch = self.arch
    pool = pool_geometry(self.overlapping_pool)
    sides = feature_sides(arch, min(images.shape[1:3]), *pool)
    if images.shape[1] != images.shape[2]:
      raise ValueError(
        f"images are {images.shape[1]}x{images.shape[2]}; AlexNet wants square crops"
      )

    # Parameters: tower layers carry a leading tower axis.
    t, params = arch.towers, {}
    for name, shapes in param_shapes(arch, self.num_classes, sides["pool5"]).items():
      bias_value = self.bias_one if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
      params[name] = dict(zip(("kernel", "bias"), self._layer(name, *shapes, bias_value)))
    fc8 = params.pop("fc8")
    k8, b8 = fc8["kernel"], fc8["bias"]

    masks = {}
    if train and self.dropout_rate > 0:
      keys = jax.random.split(self.make_rng("dropout"), len(arch.dropout_on))
      units = {
        "pool5": sides["pool5"] ** 2 * arch.conv_widths[-1],
        "fc6": arch.fc_widths[0],
        "fc7": arch.fc_widths[1],
      }
      for key, name in zip(keys, arch.dropout_on):
        masks[name] = jax.random.bernoulli(key, 1.0 - self.dropout_rate, (t, batch, units[name]))

    capture = self.is_mutable_collection("intermediates")
    fn = functools.partial(
      tower_forward,
      arch=arch,
      act=ACTIVATIONS[self.activation],
      pool=pool,
      dtype=self.dtype,
      lrn_args=dict(k=self.lrn_k, n=self.lrn_n, alpha=self.lrn_alpha, beta=self.lrn_beta),
      keep_rate=1.0 - self.dropout_rate,
      capture=capture,
      lrn_scope=self.lrn_scope,
      max_pool=OPS_IMPLS[self.ops_impl][0],
      lrn=OPS_IMPLS[self.ops_impl][1],
    )
    if self.mesh is None:
      fc7, feats = fn(params, images, masks, axis=None)
    else:
      fc7, feats = jax.shard_map(
        functools.partial(fn, axis="model"),
        mesh=self.mesh,
        in_specs=(P("model"), P("data"), P("model", "data")),
        out_specs=(P("data", "model"), P("model", "data")),
      )(params, images, masks)
    with jax.named_scope("fc8"):
      logits = (fc7 @ k8.astype(self.dtype) + b8.astype(self.dtype)).astype(jnp.float32)
    if capture:
      features = {name: merge_towers(value) for name, value in feats.items()}
      # One dict (not flax's default 1-tuples): intermediates["features"]["fc7"] is the array.
      self.sow(
        "intermediates",
        "features",
        features | {"logits": logits},
        init_fn=lambda: None,
        reduce_fn=lambda _, v: v,
      )
    return logits
