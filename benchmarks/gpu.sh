#!/usr/bin/env bash
# The benchmark table on one NVIDIA GPU: the paper net's train and evaluation steps in float32
# and bfloat16 at batch sizes 128 to 1024, then the fast ops against the plain ones at the
# largest bfloat16 batch. Needs JAX with CUDA, Flax, Optax and absl-py (no TensorFlow, no
# ml-collections); an estimated 5 minutes on an H100 (not yet run), mostly compilation.
#   bash benchmarks/gpu.sh [GPU index, default 0]
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_VISIBLE_DEVICES="${1:-0}"
python3 - <<'PY'
import jax
kinds = {d.platform for d in jax.devices()}
assert "gpu" in kinds, f"no GPU visible to JAX (devices: {jax.devices()}); install jax[cuda12] or jax[cuda13]"
print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
PY
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
date -u +"%Y-%m-%d %H:%M UTC"
python3 -m alexnet_jax.bench --variant=paper --batch_size=128,256,512,1024 --dtype=float32,bfloat16 \
  --rounds=3 --round_seconds=1
python3 -m alexnet_jax.bench --variant=paper --batch_size=1024 --dtype=bfloat16 --ops_impl=fast,plain \
  --rounds=3 --round_seconds=1
