"""Ours against PyTorch on the CPU: the paper net's train step and evaluation, side by side.

  python benchmarks/cpu_vs_torch.py [--train_batch_size=32] [--eval_batch_size=128]
    [--dtypes=float32,bfloat16] [--torch_modes=eager,compile] [--torch_layout=NCHW]
    [--rounds=5] [--round_seconds=3] [--meshes=none] [--compiler_options=backend,xla]

Both sides run the same two-tower net (PyTorch: `torch_nets.GroupedAlexNet`, the towers as
groups=2, LRN per tower) on synthetic batches already in memory. Training is SGD with momentum
0.9 and weight decay 5e-4; evaluation is the forward pass. Ours runs training's own jitted
steps (`steps.jit_steps` via `studies.benchmark`), which also turn uint8 crops into the
network's input, with each of --compiler_options (XLA:CPU option sets: on a new CPU, see
whether another set than training's serves it better), in each of --dtypes (bfloat16: the
net computes in bfloat16, parameters stay float32). PyTorch runs eager and under
torch.compile, in float32 and in bfloat16 autocast (its recommended mixed precision on CPUs,
oneDNN's bf16 kernels: AMX or AVX-512-BF16 where the CPU has them), on float input ready-made.

Every side's train and evaluation runner takes its turn in every round, so the load of other
processes falls on all alike. Ratios are against PyTorch's best side for that work (the fastest
median), as medians over rounds of per-round ratios, and of each side's fastest round. A side
whose first timed call takes longer than --max_step_seconds (bfloat16 without the CPU's bf16
instructions can be 100x slower) is reported with that one figure and left out of the rounds.
The first lines name the CPU's vector and matrix features (AVX2, AVX-512, AVX-512-BF16, AMX),
the jax and torch versions; the last line is JSON. PyTorch is a baseline here, not a
dependency (`pip install torch==2.13.0`): without it our sides are timed alone and the output
says so.
"""

import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
from absl import flags

from alexnet_jax.core import cli
from alexnet_jax.core.errors import UserInputError
from alexnet_jax.model import backend
from alexnet_jax.studies import benchmark

try:
  import torch
  import torch.nn.functional as F

  from alexnet_jax.weights.torch_nets import GroupedAlexNet
except ImportError:  # the baseline is optional: our side is timed alone, and the output says so
  torch = None


SIDE = 227
WORKS = ("train", "eval")
# /proc/cpuinfo flags that decide which kernels XLA and oneDNN can use for float32 and bfloat16.
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_description() -> dict:
  """The CPU's model and which of CPU_FEATURES it has (Linux; elsewhere the model only)."""
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
  except OSError:
    return {"model": platform.processor() or platform.machine(), "features": None}
  fields = {}
  for line in info.splitlines():  # the first processor's lines
    key, _, value = line.partition(":")
    fields.setdefault(key.strip(), value.strip())
  flags_present = set(fields.get("flags", "").split())
  return {
    "model": fields.get("model name", platform.machine()),
    "features": [f for f in CPU_FEATURES if f in flags_present],
  }


@dataclasses.dataclass(frozen=True)
class TorchSide:
  mode: str  # "eager" or "compile"
  dtype: str  # "float32" or "bfloat16" (autocast)
  layout: str  # "NCHW" or "channels_last"

  @property
  def name(self) -> str:
    precision = "bf16 autocast" if self.dtype == "bfloat16" else "float32"
    return f"torch {self.mode} {precision}"


def torch_runners(side: TorchSide, train_batch: int, eval_batch: int) -> dict[str, Callable]:
  """n PyTorch training steps, and n evaluation passes, per call."""
  torch.manual_seed(0)
  net = GroupedAlexNet()
  xs = {
    "train": torch.randn(train_batch, 3, SIDE, SIDE),
    "eval": torch.randn(eval_batch, 3, SIDE, SIDE),
  }
  if side.layout == "channels_last":
    net = net.to(memory_format=torch.channels_last)
    xs = {k: x.contiguous(memory_format=torch.channels_last) for k, x in xs.items()}
  y = torch.arange(train_batch) % 1000
  forward = torch.compile(net) if side.mode == "compile" else net
  precision = (
    (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    if side.dtype == "bfloat16"
    else contextlib.nullcontext
  )
  opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

  def train(n: int) -> None:
    net.train()
    for _ in range(n):
      opt.zero_grad(set_to_none=True)
      with precision():
        loss = F.cross_entropy(forward(xs["train"]), y)
      loss.backward()
      opt.step()

  def evaluate(n: int) -> None:
    net.eval()
    with torch.inference_mode(), precision():
      for _ in range(n):
        forward(xs["eval"])

  return {"train": train, "eval": evaluate}


def counting_cpu(run: Callable[[int], None], per_call: list) -> Callable[[int], None]:
  """`run`, recording the process's CPU seconds per call: the work done, whatever the load."""

  def counted(n: int) -> None:
    t0 = time.process_time()
    run(n)
    per_call.append((time.process_time() - t0) / n)

  return counted


def first_call_seconds(run: Callable[[int], None]) -> float:
  """One call after a warm-up call (compilation, allocation), timed."""
  run(1)
  t0 = time.perf_counter()
  run(1)
  return time.perf_counter() - t0


def define_flags() -> None:
  flags.DEFINE_integer("train_batch_size", 32, "Batch size of the training step.")
  flags.DEFINE_integer("eval_batch_size", 128, "Batch size of evaluation.")
  flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes of both sides.")
  flags.DEFINE_list("torch_modes", ["eager", "compile"], "PyTorch's modes: eager, compile.")
  flags.DEFINE_enum("torch_layout", "NCHW", ["NCHW", "channels_last"], "PyTorch's memory layout.")
  flags.DEFINE_integer("rounds", 5, "Alternating timing rounds.")
  flags.DEFINE_float("round_seconds", 3.0, "Seconds per side and work per round.")
  flags.DEFINE_float(
    "max_step_seconds", 20.0, "A side slower than this per call is timed once, not in rounds."
  )
  flags.DEFINE_list("meshes", ["none"], "Our meshes, comma-separated: none, 1x2, ...")
  flags.DEFINE_list(
    "compiler_options",
    ["backend"],
    "Our XLA:CPU option sets: backend (what training uses) or names in backend.CPU_OPTION_SETS.",
  )


def check_choices(args) -> None:
  """One line naming a bad --dtypes, --torch_modes or --compiler_options, before any work."""
  for flag, allowed in (
    ("dtypes", ("float32", "bfloat16")),
    ("torch_modes", ("eager", "compile")),
    ("compiler_options", ("backend", *backend.CPU_OPTION_SETS)),
  ):
    bad = [v for v in getattr(args, flag) if v not in allowed]
    if bad:
      raise UserInputError(f"--{flag}: unknown {', '.join(bad)}; use some of {', '.join(allowed)}")


def main() -> None:
  cli.simulate_cpu_devices(2)  # before JAX starts its backend: the 1x2 mesh on a CPU host
  args = flags.FLAGS
  check_choices(args)
  batch = {"train": args.train_batch_size, "eval": args.eval_batch_size}
  runners = {}  # (side, work) -> run(n)
  for mesh, dtype, options in itertools.product(args.meshes, args.dtypes, args.compiler_options):
    name = " ".join(
      ["ours", dtype]
      + ([] if mesh == benchmark.MESH_NONE else [mesh])
      + ([] if options == "backend" else [options])
    )
    case = benchmark.Case(mesh, dtype, batch["train"], compiler_options=options)
    built = benchmark.build(case, "paper", SIDE, eval_batch_size=batch["eval"])
    runners[(name, "train")], runners[(name, "eval")] = built.train, built.evaluate
  torch_names = []
  if torch is not None:
    for mode in args.torch_modes:
      for dtype in args.dtypes:
        side = TorchSide(mode, dtype, args.torch_layout)
        torch_names.append(side.name)
        for work, run in torch_runners(side, batch["train"], batch["eval"]).items():
          runners[(side.name, work)] = run
  seconds = {}
  for key, run in runners.items():
    seconds[key] = first_call_seconds(run)
    print(f"ready: {key[0]} {key[1]} ({seconds[key]:.3g} s per call)", file=sys.stderr, flush=True)
  once = {k: s for k, s in seconds.items() if s > args.max_step_seconds}  # timed once only
  runners = {k: r for k, r in runners.items() if k not in once}
  counts = {k: max(1, round(args.round_seconds / seconds[k])) for k in runners}
  cpu = {k: [] for k in runners}
  times = benchmark.time_rounds(
    {k: counting_cpu(r, cpu[k]) for k, r in runners.items()}, counts, args.rounds
  )
  times |= {k: [s] * args.rounds for k, s in once.items()}
  names = list(dict.fromkeys(k[0] for k in seconds))  # in the order built
  best = {
    work: max(
      (n for n in torch_names if (n, work) in times),
      key=lambda n: 1 / statistics.median(times[(n, work)]),
      default=None,
    )
    for work in WORKS
  }
  rows = {}
  for name in names:
    row = {}
    for work in WORKS:
      t = times[(name, work)]
      row[f"{work}_images_per_sec"] = round(batch[work] / statistics.median(t), 2)
      row[f"{work}_best_round"] = round(batch[work] / min(t), 2)
      row[f"{work}_timed_once"] = (name, work) in once
      base = best[work] and times[(best[work], work)]
      row[f"{work}_x_torch_best"] = base and round(benchmark.median_ratio(base, t), 3)
      row[f"{work}_x_torch_best_rounds"] = base and round(min(base) / min(t), 3)
    row["train_cpu_seconds_per_step"] = (
      round(statistics.median(cpu[(name, "train")]), 3) if (name, "train") in cpu else None
    )
    rows[name] = row
  cpu_info = cpu_description()
  features = (
    "unknown" if cpu_info["features"] is None else ", ".join(cpu_info["features"]) or "none"
  )
  torch_info = (
    f"torch {torch.__version__} ({torch.get_num_threads()} threads, "
    f"{torch.backends.cpu.get_cpu_capability()} kernels, {args.torch_layout})"
    if torch is not None
    else "torch not installed: no baseline, ratios left out (pip install torch to time it)"
  )
  print(f"CPU: {cpu_info['model']}, {os.cpu_count()} CPUs; features: {features}")
  print(
    f"jax {jax.__version__}; {torch_info}; paper net {SIDE}x{SIDE}, train batch {batch['train']}, "
    f"eval batch {batch['eval']}, {args.rounds} alternating rounds, {datetime.date.today()}"
  )
  print(
    "| side | train img/s | x torch best | eval img/s | x torch best | CPU s per train step |\n"
    "|---|---|---|---|---|---|"
  )
  for name, r in rows.items():
    cells = [
      f"{r[f'{w}_images_per_sec']}{' (once)' if r[f'{w}_timed_once'] else ''} | "
      f"{'-' if r[f'{w}_x_torch_best'] is None else r[f'{w}_x_torch_best']}"
      for w in WORKS
    ]
    print(f"| {name} | {cells[0]} | {cells[1]} | {r['train_cpu_seconds_per_step']} |")
  for work in WORKS:
    if best[work]:
      ours = max(
        (n for n in names if n.startswith("ours")), key=lambda n: rows[n][f"{work}_images_per_sec"]
      )
      print(
        f"{work}: our best ({ours}) is {rows[ours][f'{work}_x_torch_best']}x PyTorch's best "
        f"({best[work]})"
      )
  print(
    json.dumps(
      {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_info,
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "torch": torch and torch.__version__,
        "torch_threads": torch and torch.get_num_threads(),
        "torch_layout": args.torch_layout,
        "batch_size": batch,
        "image_size": SIDE,
        "rounds": args.rounds,
        "torch_best": best,
        "results": rows,
      }
    )
  )


if __name__ == "__main__":
  cli.run(main, define_flags)
