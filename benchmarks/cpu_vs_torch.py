"""The paper net's training step in JAX (ours) and in PyTorch eager, timed in one process.

  python benchmarks/cpu_vs_torch.py [--batch_size=32] [--rounds=7] [--meshes=none,1x2]

Both sides train the same two-tower net (PyTorch: `torch_nets.GroupedAlexNet`, the towers
as groups=2, LRN per tower) with SGD, momentum 0.9 and weight decay 5e-4, at fp32 on
synthetic batches already in memory. Ours runs training's own step (`steps.make_train_step`
via `alexnet_jax.bench`), which also turns uint8 crops into the network's input; PyTorch
gets float input ready-made. PyTorch runs in its default NCHW layout and in channels_last,
its faster CPU layout where oneDNN has one. The sides take turns in every round, so the
load of other processes falls on all alike; ratios are medians over rounds of per-round
ratios, and also of each side's fastest round (the nearest to an idle machine). CPU seconds
per step are the work each side spent (a busy wait counts too). The PyTorch side runs where
torch is installed (`pip install torch==2.13.0` on the development machine): it is a baseline
here, not a dependency; without it our side is timed alone and the output says so. The last
line is JSON.
"""

import json
import os
import statistics
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
from absl import flags

from alexnet_jax.core import cli
from alexnet_jax.studies import benchmark

try:
  import torch
  import torch.nn.functional as F

  from alexnet_jax.weights.torch_nets import GroupedAlexNet
except ImportError:  # the baseline is optional: our side is timed alone, and the output says so
  torch = None


SIDE = 227


def torch_runner(batch_size: int, channels_last: bool):
  """n PyTorch eager training steps per call."""
  torch.manual_seed(0)
  net = GroupedAlexNet()
  x = torch.randn(batch_size, 3, SIDE, SIDE)
  if channels_last:
    net, x = (
      net.to(memory_format=torch.channels_last),
      x.contiguous(memory_format=torch.channels_last),
    )
  y = torch.arange(batch_size) % 1000
  opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
  net.train()

  def train(n: int) -> None:
    for _ in range(n):
      opt.zero_grad(set_to_none=True)
      F.cross_entropy(net(x), y).backward()
      opt.step()

  train(1)
  return train


def counting_cpu(run: Callable[[int], None], per_call: list) -> Callable[[int], None]:
  """`run`, recording the process's CPU seconds per call: the work done, whatever the load."""

  def counted(n: int) -> None:
    t0 = time.process_time()
    run(n)
    per_call.append((time.process_time() - t0) / n)

  return counted


def define_flags() -> None:
  flags.DEFINE_integer("batch_size", 32, "Global batch size.")
  flags.DEFINE_integer("rounds", 7, "Alternating timing rounds.")
  flags.DEFINE_float("round_seconds", 3.0, "Seconds per side per round.")
  flags.DEFINE_list("meshes", ["none"], "Our meshes, comma-separated: none, 1x2, ...")


def main() -> None:
  cli.simulate_cpu_devices(2)  # before JAX starts its backend: the 1x2 mesh on a CPU host
  args = flags.FLAGS
  runners = {}
  for mesh in args.meshes:
    runners[f"jax {mesh}"] = benchmark.build(
      benchmark.Case(mesh, "float32", args.batch_size), "paper", SIDE
    ).train
  torch_sides = ("torch NCHW", "torch channels_last") if torch is not None else ()
  for side in torch_sides:
    runners[side] = torch_runner(args.batch_size, channels_last=side.endswith("channels_last"))
  counts = {k: benchmark.steps_for(r, args.round_seconds) for k, r in runners.items()}
  cpu = {k: [] for k in runners}
  times = benchmark.time_rounds(
    {k: counting_cpu(r, cpu[k]) for k, r in runners.items()}, counts, args.rounds
  )
  torch_best = min(torch_sides, key=lambda k: statistics.median(times[k]), default=None)
  rows = {
    k: {
      "images_per_sec": round(args.batch_size / statistics.median(t), 2),
      "images_per_sec_best": round(args.batch_size / min(t), 2),
      "speedup_vs_torch_eager": torch_best
      and round(benchmark.median_ratio(times[torch_best], t), 3),
      "speedup_best_rounds": torch_best and round(min(times[torch_best]) / min(t), 3),
      "cpu_seconds_per_step": round(statistics.median(cpu[k]), 3),
    }
    for k, t in times.items()
  }
  torch_info = (
    f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if torch is not None
    else "torch not installed: no baseline, ratios left out (pip install torch to time it)"
  )
  print(
    f"batch {args.batch_size}, fp32, {SIDE}x{SIDE}, {args.rounds} alternating rounds; "
    f"{torch_info}, jax {jax.__version__}, {os.cpu_count()} CPUs"
    + (f"; ratios against {torch_best}" if torch_best else "")
  )
  print(
    "| side | train img/s (median) | best round | x torch eager (median of rounds) "
    "| x torch eager (best rounds) | CPU s per step |\n|---|---|---|---|---|---|"
  )
  for k, r in rows.items():
    print(
      f"| {k} | {r['images_per_sec']} | {r['images_per_sec_best']} | "
      f"{r['speedup_vs_torch_eager']} | {r['speedup_best_rounds']} | {r['cpu_seconds_per_step']} |"
    )
  print(
    json.dumps(
      {
        "batch_size": args.batch_size,
        "image_size": SIDE,
        "rounds": args.rounds,
        "torch": torch and torch.__version__,
        "torch_threads": torch and torch.get_num_threads(),
        "jax": jax.__version__,
        "cpus": os.cpu_count(),
        "torch_baseline": torch_best,
        "results": rows,
      }
    )
  )


if __name__ == "__main__":
  cli.run(main, define_flags)
