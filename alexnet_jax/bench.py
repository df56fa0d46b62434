"""Forward+backward throughput of the model on synthetic, device-resident batches.

  python -m alexnet_jax.bench --variant=paper --batch_size=32 --meshes=none,1x2

Each mesh is timed in turn, in the same process, so the figures compare side by side;
the last line is JSON. On a CPU host, simulated devices are created for the meshes.
"""

import os
import sys

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()

import json
import time

from absl import app, flags
import jax
import jax.numpy as jnp

from alexnet_jax import sharding
from alexnet_jax.models import AlexNet

_VARIANT = flags.DEFINE_enum("variant", "paper", ["paper", "torchvision"], "Which net.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Global batch size.")
_SIZE = flags.DEFINE_integer("image_size", 227, "Input side.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Computation dtype.")
_MESHES = flags.DEFINE_list("meshes", ["none", "1x2"], "'none' (no mesh) or DATAxMODEL, each timed in turn.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per mesh (after one warm-up).")


def fwd_bwd_images_per_sec(mesh_name: str, batch: int, side: int, variant: str, dtype, steps: int) -> dict:
  """Times value_and_grad of the cross-entropy loss for one mesh."""
  mesh = None
  if mesh_name != "none":
    data, model = (int(v) for v in mesh_name.split("x"))
    mesh = sharding.make_mesh(model, jax.devices()[:data * model])
  net = AlexNet(variant=variant, mesh=mesh, dtype=dtype)
  x = jax.random.normal(jax.random.key(1), (batch, side, side, 3))
  y = jnp.arange(batch) % 1000
  params = AlexNet(variant=variant).init(jax.random.key(0), x[:1])["params"]
  if mesh is not None:
    params = jax.device_put(params, sharding.tree_shardings(params, mesh))
    x = jax.device_put(x, sharding.batch_sharding(mesh))

  @jax.jit
  def step(params, x, y):
    def loss(p):
      logits = net.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(2)})
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
    return jax.value_and_grad(loss)(params)

  t0 = time.perf_counter()
  jax.block_until_ready(step(params, x, y))
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    out = step(params, x, y)
  jax.block_until_ready(out)
  return {"mesh": mesh_name, "images_per_sec": round(batch * steps / (time.perf_counter() - t0), 2),
          "first_step_s": round(compile_s, 2)}


def main(argv):
  del argv
  dtype = jnp.bfloat16 if _DTYPE.value == "bfloat16" else jnp.float32
  rows = []
  for name in _MESHES.value:
    row = fwd_bwd_images_per_sec(name, _BATCH.value, _SIZE.value, _VARIANT.value, dtype, _STEPS.value)
    print(f"mesh {row['mesh']:>5}: {row['images_per_sec']:8.2f} images/s fwd+bwd "
          f"(first step incl. compile {row['first_step_s']} s)", file=sys.stderr)
    rows.append(row)
  base = rows[0]["images_per_sec"]
  for row in rows:
    row["ratio_to_first"] = round(row["images_per_sec"] / base, 3)
  print(json.dumps({"variant": _VARIANT.value, "batch_size": _BATCH.value, "dtype": _DTYPE.value,
                    "device": jax.devices()[0].device_kind, "results": rows}))


if __name__ == "__main__":
  app.run(main)
