"""conv1 (11x11, stride 4, 3 -> 96 channels at 227x227) in three forms, timed side by side:
whether expressing it as a product reaches a faster path than XLA's convolution.

  python benchmarks/conv1_forms.py [--batch_size=32] [--rounds=5]

- conv: `lax.conv_general_dilated`, what the net runs (on the CPU: Eigen, `backend`'s options).
- patches: the 363-value patches of every output pixel (`conv_general_dilated_patches`) times
  a (363, 96) matrix: one dot.
- space_to_depth: the input folded 4x4 into 48 channels, the kernel padded to 12x12 and folded
  alike: a stride-1 3x3 convolution (the TPU trick for strided first layers).

Each form's forward pass and its kernel gradient, compiled with `backend.compiler_options()`,
checked equal to conv's first, then timed in alternating rounds; ratios against conv. The
last line is JSON.
"""

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from alexnet_jax.core import cli
from alexnet_jax.model import backend
from alexnet_jax.studies import benchmark

DN = ("NHWC", "HWIO", "NHWC")
SIDE, OUT = 227, 55


def conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (4, 4), "VALID", dimension_numbers=DN)


def patches(x, w):
  p = jax.lax.conv_general_dilated_patches(x, (11, 11), (4, 4), "VALID", dimension_numbers=DN)
  return p @ jnp.transpose(w, (2, 0, 1, 3)).reshape(-1, w.shape[-1])  # patches are (C, H, W)


def space_to_depth(x, w):
  b, c, o = x.shape[0], x.shape[-1], w.shape[-1]
  x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # 228 = 57 x 4
  x = x.reshape(b, 57, 4, 57, 4, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, 57, 57, 16 * c)
  w = jnp.pad(w, ((0, 1), (0, 1), (0, 0), (0, 0)))  # 12 = 3 x 4
  w = w.reshape(3, 4, 3, 4, c, o).transpose(0, 2, 1, 3, 4, 5).reshape(3, 3, 16 * c, o)
  return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=DN)[:, :OUT, :OUT]


FORMS = {"conv": conv, "patches": patches, "space_to_depth": space_to_depth}


def define_flags() -> None:
  flags.DEFINE_integer("batch_size", 32, "Images per call.")
  flags.DEFINE_integer("rounds", 5, "Alternating timing rounds.")
  flags.DEFINE_float("round_seconds", 1.0, "Seconds per form and pass per round.")


def main() -> None:
  args = flags.FLAGS
  x = jax.random.normal(jax.random.key(0), (args.batch_size, SIDE, SIDE, 3))
  w = jax.random.normal(jax.random.key(1), (11, 11, 3, 96)) * 0.01
  jit = lambda f: jax.jit(f, compiler_options=backend.compiler_options())
  reference = np.asarray(jit(conv)(x, w))
  runners = {}
  for name, form in FORMS.items():
    np.testing.assert_allclose(jit(form)(x, w), reference, atol=1e-4, err_msg=name)
    forward = jit(form)
    kernel_grad = jit(jax.grad(lambda x, w, f=form: jnp.sum(f(x, w) ** 2), argnums=1))
    for pass_name, fn in (("forward", forward), ("kernel gradient", kernel_grad)):
      runners[(name, pass_name)] = lambda n, fn=fn: [
        jax.block_until_ready(fn(x, w)) for _ in range(n)
      ]
  counts = {k: benchmark.steps_for(r, args.round_seconds) for k, r in runners.items()}
  times = benchmark.time_rounds(runners, counts, args.rounds)
  rows = {
    f"{name} {pass_name}": {
      "ms": round(1000 * statistics.median(t), 2),
      "x_conv": round(benchmark.median_ratio(times[("conv", pass_name)], t), 3),
    }
    for (name, pass_name), t in times.items()
  }
  print(f"conv1 at batch {args.batch_size}, jax {jax.__version__}, {jax.devices()[0].device_kind}")
  print("| form, pass | ms per call | x conv |\n|---|---|---|")
  for key, r in rows.items():
    print(f"| {key} | {r['ms']} | {r['x_conv']} |")
  print(json.dumps({"jax": jax.__version__, "batch_size": args.batch_size, "results": rows}))


if __name__ == "__main__":
  cli.run(main, define_flags)
