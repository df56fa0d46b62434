"""Throughput of training's own steps on synthetic, device-resident batches.

  python -m alexnet_jax.bench --variant=paper --batch_size=32 --dtype=float32
  python -m alexnet_jax.bench --batch_size=128,256,512 --dtype=float32,bfloat16 --meshes=none,1x2

Every case (mesh x dtype x batch size x ops x compiler options) runs the train step training
runs (forward, backward, the paper's SGD: `steps.make_train_step`) and the evaluation step,
jitted with the backend's compiler options or, on the CPU, a named set to compare
(`--compiler_options=eigen_conv,no_ynnpack,xla`). All cases are compiled first, then timed
in alternating rounds, so that a busy machine slows them alike and their ratios hold. Prints a
markdown table, then, last, one JSON line whose `images_per_sec` is the first case's train step.
Imports neither TensorFlow nor the configs: it runs on any machine with JAX, Flax and Optax.
On a CPU host, simulated devices are created for the meshes.
"""

from __future__ import annotations

import json

from absl import flags

from alexnet_jax.core import cli
from alexnet_jax.core.errors import UserInputError
from alexnet_jax.model import alexnet, backend
from alexnet_jax.studies import benchmark


def define_flags() -> None:
  flags.DEFINE_enum("variant", "paper", list(alexnet.VARIANTS), "Which net.")
  flags.DEFINE_list("batch_size", ["32"], "Global batch sizes, e.g. 32,128,512.")
  flags.DEFINE_integer("image_size", 227, "Input side.")
  flags.DEFINE_list("dtype", ["float32"], "Computation dtypes: float32, bfloat16 or both.")
  flags.DEFINE_list(
    "meshes", ["none"], "'none' (no mesh) or DATAxMODEL (e.g. 1x2: one tower per device)."
  )
  flags.DEFINE_list("ops_impl", ["fast"], "AlexNet(ops_impl=...): fast, plain or both.")
  flags.DEFINE_list(
    "compiler_options",
    ["backend"],
    "backend (backend.compiler_options(), what training uses) or XLA:CPU option sets of "
    f"backend.CPU_OPTION_SETS ('xla': XLA's defaults): {', '.join(backend.CPU_OPTION_SETS)}.",
  )
  flags.DEFINE_integer("rounds", 3, "Alternating timing rounds; figures are medians over rounds.")
  flags.DEFINE_float("round_seconds", 2.0, "Train-step seconds per case per round (eval: half).")
  flags.DEFINE_float(
    "peak_tflops", None, "Peak TFLOP/s for MFU on a device the table does not know."
  )


def main() -> None:
  cli.simulate_cpu_devices(2)  # before JAX starts its backend: meshes on a CPU host
  f = flags.FLAGS
  try:
    cases = [
      benchmark.Case(m, d, int(b), o, x)
      for m in f.meshes
      for d in f.dtype
      for b in f.batch_size
      for o in f.ops_impl
      for x in f.compiler_options
    ]
    for c in cases:
      if (
        c.dtype not in ("float32", "bfloat16")
        or c.ops_impl not in alexnet.OPS_IMPLS
        or c.batch_size < 1
        or c.compiler_options not in ("backend", *backend.CPU_OPTION_SETS)
      ):
        raise UserInputError(
          f"bad case {c}: dtype float32 or bfloat16, ops_impl one of {tuple(alexnet.OPS_IMPLS)}, "
          f"batch_size >= 1, compiler_options backend or one of {tuple(backend.CPU_OPTION_SETS)}"
        )
    report = benchmark.run(cases, f.variant, f.image_size, f.rounds, f.round_seconds, f.peak_tflops)
  except ValueError as e:  # the library's word for a case this machine cannot benchmark.run
    raise UserInputError(str(e)) from None
  print(benchmark.markdown(report))
  print(json.dumps(report))


if __name__ == "__main__":
  cli.run(main, define_flags)
