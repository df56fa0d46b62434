#!/usr/bin/env bash
# Starts training on one or many processes; arguments go to `python -m alexnet_jax.main`.
#
#   ./launch.sh --config=configs/quickstart.py --workdir=DIR            # one process
#   NUM_PROCESSES=2 ./launch.sh --config=... --workdir=DIR              # 2 processes on this machine
#   srun ./launch.sh --config=... --workdir=DIR                         # SLURM: JAX finds its peers
#
# On one machine, N processes join JAX's distributed runtime with the coordinator on
# 127.0.0.1:$COORDINATOR_PORT (CPU collectives through gloo), told by JAX_COORDINATOR_ADDRESS,
# JAX_NUM_PROCESSES and JAX_PROCESS_ID. For simulated CPU devices per process set
# XLA_FLAGS=--xla_force_host_platform_device_count=K. On a cluster start one copy of this
# script per process with NUM_PROCESSES unset (srun, mpirun, every host of a TPU pod): JAX's
# cluster detection finds the others, or set the three JAX_* variables per process
# (docs/clusters.md).
set -euo pipefail
cd "$(dirname "$0")"
n="${NUM_PROCESSES:-1}"
if [ "$n" -le 1 ]; then
  exec python -m alexnet_jax.main "$@"
fi
port="${COORDINATOR_PORT:-12355}"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < n; i++)); do
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$n" JAX_PROCESS_ID="$i" \
    python -m alexnet_jax.main "$@" &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
