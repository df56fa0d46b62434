"""Timing of training's own jitted steps (`steps.jit_steps`), the work of
`python -m alexnet_jax.bench`.

Batches are synthetic and already on the devices, so the figures are the step's alone. Every
case is compiled first, then all are timed in alternating rounds: a busy machine slows them
alike and their ratios hold. Imports neither TensorFlow nor the configs: it runs on any
machine with JAX, Flax and Optax.
"""

import dataclasses
import datetime
import math
import statistics
import sys
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from alexnet_jax.model import alexnet, backend, sharding
from alexnet_jax.model.alexnet import AlexNet
from alexnet_jax.training import optim, steps

MESH_NONE = "none"


@dataclasses.dataclass(frozen=True)
class Case:
  mesh: str  # "none" or "DATAxMODEL"
  dtype: str
  batch_size: int
  ops_impl: str = "fast"
  # "backend": backend.compiler_options(), else a name in backend.CPU_OPTION_SETS ("xla": XLA's
  # defaults).
  compiler_options: str = "backend"


@dataclasses.dataclass
class Built:
  train: Callable[[int], None]  # runs n train steps and waits for them
  evaluate: Callable[[int], None]  # runs n evaluation steps and waits for them
  compile_s: float  # the train step's lowering and compilation
  # XLA's estimate for the compiled train step per device: arguments + outputs + temporaries.
  memory_bytes: int | None


def train_flops_per_image(model: AlexNet, image_size: int) -> float:
  """Model FLOPs of one trained image: 2 per multiply-add of the convolutions and fully
  connected layers, x3 for forward and backward. 4.35e9 for the paper's net at 227x227."""
  arch = model.arch
  sides = alexnet.feature_sides(arch, image_size, *alexnet.pool_geometry(model.overlapping_pool))
  macs = sum(
    math.prod(kernel) * sides.get(name, 1) ** 2
    for name, (kernel, _) in alexnet.param_shapes(arch, model.num_classes, sides["pool5"]).items()
  )
  return 6.0 * macs


def parse_mesh(name: str) -> Mesh | None:
  """'none' or DATAxMODEL over the first DATA*MODEL devices, or a ValueError saying what is
  wrong."""
  if name == MESH_NONE:
    return None
  try:
    data, model = (int(v) for v in name.split("x"))
  except ValueError:
    raise ValueError(f"mesh {name!r}: use '{MESH_NONE}' or DATAxMODEL, e.g. 1x2") from None
  if data * model > jax.device_count():
    raise ValueError(
      f"mesh {name} needs {data * model} devices; this process has {jax.device_count()}"
      + (
        " (set XLA_FLAGS=--xla_force_host_platform_device_count=N for more CPU devices)"
        if jax.default_backend() == "cpu"
        else ""
      )
    )
  return sharding.make_mesh(model, jax.devices()[: data * model])


def synthetic_batch(batch_size: int, image_size: int, train: bool) -> dict:
  """A batch in the input pipeline's format: uint8 crops and their augmentation draws."""
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8),
    "offset": np.zeros((batch_size, 2), np.int32),
    "flip": rng.random(batch_size) < 0.5,
    "label": (np.arange(batch_size) % 1000).astype(np.int32),
  }
  if train:
    batch["colour"] = rng.normal(0, 1, (batch_size, 3)).astype(np.float32)
  else:
    batch["mask"] = np.ones(batch_size, np.float32)
  return batch


def build(
  case: Case,
  variant: str,
  image_size: int,
  batches: Iterator[dict] | None = None,
  mean_image: np.ndarray | None = None,
  eval_batch_size: int | None = None,
) -> Built:
  """Compiles the train and evaluation steps of one case on device-resident synthetic data,
  evaluation at `eval_batch_size` when given (else the case's batch size).

  With `batches` (host batches from the input pipeline, with their `mean_image`) every train
  step takes the next of them instead, put on the devices as training puts them.
  """
  options = (  # CPU option sets are XLA:CPU's flags: other backends ignore them
    backend.compiler_options()
    if case.compiler_options == "backend"
    else backend.cpu_option_set(case.compiler_options)
  )
  mesh = parse_mesh(case.mesh)
  data = 1 if mesh is None else mesh.shape["data"]
  if case.batch_size % data:
    raise ValueError(
      f"batch {case.batch_size} does not divide over mesh {case.mesh}'s data axis of size {data}; "
      "use a multiple of it"
    )
  model = AlexNet(variant=variant, mesh=mesh, dtype=jnp.dtype(case.dtype), ops_impl=case.ops_impl)
  tx = optim.paper_sgd(0.01)
  params = model.clone(mesh=None).init(
    jax.random.key(0), jnp.zeros((1, image_size, image_size, 3))
  )["params"]
  state = steps.new_state(params, tx.init(params))
  train_batch = synthetic_batch(case.batch_size, image_size, train=True)
  eval_batch = synthetic_batch(eval_batch_size or case.batch_size, image_size, train=False)
  if batches is not None:
    train_batch = next(batches)
  mean = np.zeros((image_size, image_size, 3), np.float32) if mean_image is None else mean_image
  if mesh is None:
    device = jax.devices()[0]
    state_sh = None
    put = lambda batch: jax.device_put(batch, device)
    state, train_batch, eval_batch, mean = jax.device_put(
      (state, train_batch, eval_batch, mean), device
    )
  else:
    state_sh, batch_sh = sharding.tree_shardings(state, mesh), sharding.batch_sharding(mesh)
    put = lambda batch: jax.device_put(batch, batch_sh)
    state, mean = jax.device_put(state, state_sh), jax.device_put(mean, sharding.replicated(mesh))
    train_batch, eval_batch = put((train_batch, eval_batch))
  train_jit, eval_jit = steps.jit_steps(model, tx, state_sh, mesh, seed=0, compiler_options=options)
  t0 = time.perf_counter()
  train_step = train_jit.lower(state, train_batch, mean).compile()
  compile_s = time.perf_counter() - t0
  eval_step = eval_jit.lower(state.params, eval_batch, mean).compile()
  analysis = train_step.memory_analysis()
  memory = (
    None
    if analysis is None
    else (
      analysis.argument_size_in_bytes
      + analysis.output_size_in_bytes
      + analysis.temp_size_in_bytes
      - analysis.alias_size_in_bytes
    )
  )
  current = [state]

  def train(n: int) -> None:
    for _ in range(n):
      current[0], _ = train_step(
        current[0], train_batch if batches is None else put(next(batches)), mean
      )
    jax.block_until_ready(current[0])

  def evaluate(n: int) -> None:
    for _ in range(n):
      out = eval_step(current[0].params, eval_batch, mean)
    jax.block_until_ready(out)

  train(1)  # the first run allocates and warms up
  evaluate(1)
  return Built(train, evaluate, compile_s, memory)


def steps_for(run: Callable[[int], None], seconds: float) -> int:
  """How many calls of `run` fill about `seconds`, from the time of one."""
  t0 = time.perf_counter()
  run(1)
  return max(1, round(seconds / (time.perf_counter() - t0)))


def time_rounds(
  runners: dict[Any, Callable[[int], None]], counts: dict[Any, int], rounds: int
) -> dict[Any, list[float]]:
  """Seconds per call of every runner in each round; the runners take turns within a round,
  so that load from other processes falls on all of them alike."""
  times = {key: [] for key in runners}
  for _ in range(rounds):
    for key, run in runners.items():
      t0 = time.perf_counter()
      run(counts[key])
      times[key].append((time.perf_counter() - t0) / counts[key])
  return times


def median_ratio(base: list[float], other: list[float]) -> float:
  """Median over rounds of base time / other time per call: how many times faster `other` ran."""
  return statistics.median(b / o for b, o in zip(base, other))


def run(
  cases: list[Case],
  variant: str,
  image_size: int,
  rounds: int,
  round_seconds: float,
  peak_tflops: float | None = None,
) -> dict:
  """Builds, times and reports every case; the report is JSON-serialisable. MFU is against
  `peak_tflops` when given, else against the device's entry in `backend.PEAK_FLOPS`."""
  for dtype in sorted({c.dtype for c in cases}):
    backend.check_dtype(dtype)
  device = jax.devices()[0]
  peak_flops = lambda dtype: (
    peak_tflops * 1e12 if peak_tflops else backend.peak_flops(device.device_kind, dtype)
  )
  train_flops = train_flops_per_image(AlexNet(variant=variant), image_size)
  built = {}
  for case in cases:
    print(f"compiling {case}", file=sys.stderr)
    built[case] = build(case, variant, image_size)
  runners = {(c, "train"): b.train for c, b in built.items()} | {
    (c, "eval"): b.evaluate for c, b in built.items()
  }
  counts = {
    key: steps_for(r, round_seconds / (1 if key[1] == "train" else 2)) for key, r in runners.items()
  }
  times = time_rounds(runners, counts, rounds)
  rows = []
  for case in cases:
    train_s, eval_s = times[(case, "train")], times[(case, "eval")]
    row = dataclasses.asdict(case) | {
      "images_per_sec": round(case.batch_size / statistics.median(train_s), 2),
      "images_per_sec_best": round(case.batch_size / min(train_s), 2),
      "eval_images_per_sec": round(case.batch_size / statistics.median(eval_s), 2),
      "train_ratio_to_first": round(
        median_ratio(times[(cases[0], "train")], train_s) * case.batch_size / cases[0].batch_size, 3
      ),
      "compile_s": round(built[case].compile_s, 2),
      "memory_gb": None
      if built[case].memory_bytes is None
      else round(built[case].memory_bytes / 2**30, 3),
    }
    peak = peak_flops(case.dtype)
    if peak:
      row["mfu"] = round(row["images_per_sec"] * train_flops / peak, 4)
      row["eval_mfu"] = round(row["eval_images_per_sec"] * train_flops / 3 / peak, 4)
    rows.append(row)
  stats = device.memory_stats() or {}
  unknown = sorted({c.dtype for c in cases if not peak_flops(c.dtype)})
  return {
    "images_per_sec": rows[0]["images_per_sec"],
    "variant": variant,
    "image_size": image_size,
    "device": device.device_kind,
    "platform": device.platform,
    "device_count": jax.device_count(),
    "jax": jax.__version__,
    "date": datetime.date.today().isoformat(),
    "rounds": rounds,
    "backend_compiler_options": backend.compiler_options(),
    "train_gflop_per_image": round(train_flops / 1e9, 3),
    "peak_memory_gb": (
      round(stats["peak_bytes_in_use"] / 2**30, 3)
      if "peak_bytes_in_use" in stats
      else f"not available on {device.platform}"
    ),
    "mfu_note": (
      f"no peak FLOP/s known for {device.device_kind!r} in {', '.join(unknown)}: MFU left out "
      "(pass --peak_tflops)"
      if unknown
      else "MFU against the dense peak in backend.PEAK_FLOPS"
    ),
    "results": rows,
  }


def markdown(report: dict) -> str:
  """The report's cases as a markdown table."""
  head = (
    "| mesh | dtype | batch | ops | compiler options | train img/s | x first row | eval img/s | "
    "train MFU | "
    "compile s | GB per device |\n|---|---|---|---|---|---|---|---|---|---|---|"
  )
  lines = [
    f"| {r['mesh']} | {r['dtype']} | {r['batch_size']} | {r['ops_impl']} | "
    f"{r['compiler_options']} | "
    f"{r['images_per_sec']} | "
    f"{r['train_ratio_to_first']} | {r['eval_images_per_sec']} | "
    f"{'-' if 'mfu' not in r else format(r['mfu'], '.1%')} | {r['compile_s']} | {r['memory_gb']} |"
    for r in report["results"]
  ]
  return "\n".join(
    [
      f"{report['device']} ({report['platform']}), {report['variant']} net, "
      f"{report['image_size']}x{report['image_size']}, {report['date']}",
      "",
      head,
    ]
    + lines
  )
