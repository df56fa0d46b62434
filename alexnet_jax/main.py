"""Training and evaluation, the package's main command:

  python -m alexnet_jax.main --config=configs/default.py --workdir=DIR [--mode=eval]
    [--config.KEY=VALUE ...]

Only flags here: the work is `training.train.train_and_evaluate` and
`training.train.evaluate_checkpoint`.
"""

import os
import socket
import sys
import time

from absl import flags

from alexnet_jax.core import cli
from alexnet_jax.training import agreement

FLAGS = flags.FLAGS


def define_flags() -> None:
  from ml_collections import config_flags

  config_flags.DEFINE_config_file(
    "config", "configs/quickstart.py", "Config file (get_config()).", lock_config=True
  )
  flags.DEFINE_string(
    "workdir", None, "Where checkpoints, metrics and the config go.", required=True
  )
  flags.DEFINE_enum(
    "mode", "train", ["train", "eval"], "train (resuming if possible), or evaluate a checkpoint."
  )
  flags.DEFINE_integer("step", None, "With --mode=eval: the checkpoint step (default: the latest).")
  flags.DEFINE_string(
    "coordinator_address",
    os.environ.get("JAX_COORDINATOR_ADDRESS"),
    "host:port of process 0, for multi-process runs.",
  )
  flags.DEFINE_integer(
    "num_processes", int(os.environ.get("JAX_NUM_PROCESSES", 1)), "Number of processes."
  )
  flags.DEFINE_integer(
    "process_id", int(os.environ.get("JAX_PROCESS_ID", 0)), "This process's index."
  )
  flags.DEFINE_integer("coordinator_timeout", 300, "Seconds to wait for all processes to join.")
  flags.DEFINE_integer(
    "collective_timeout",
    600,
    "Several processes on CPUs: seconds one collective operation waits for the others.",
  )


def _reachable(address: str, timeout: float) -> bool:
  """Whether something listens at host:port within `timeout` seconds."""
  host, port = address.rsplit(":", 1)
  deadline = time.time() + timeout
  while time.time() < deadline:
    try:
      socket.create_connection((host, int(port)), timeout=1).close()
      return True
    except OSError:
      time.sleep(0.5)
  return False


def _start_distributed() -> None:
  """Joins the other processes when there are any (flags, JAX's variables, or a SLURM job)."""
  import jax

  address, count, index = FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
  timeout = FLAGS.coordinator_timeout
  if address and count > 1:
    agreement.limit_collective_waits(FLAGS.collective_timeout)  # before the backend starts
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only the CPU backend reads it
    if index != 0 and not _reachable(address, timeout):
      # The runtime would abort the process with pages of gRPC detail instead.
      sys.exit(
        f"error: process {index} of {count} could not join the coordinator at {address} within "
        f"{timeout} s: start process 0 first, and check the address and port"
      )
    jax.distributed.initialize(
      coordinator_address=address,
      num_processes=count,
      process_id=index,
      initialization_timeout=timeout,
    )
  elif (
    int(os.environ.get("SLURM_NTASKS", "1")) > 1
    or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
  ):
    agreement.limit_collective_waits(FLAGS.collective_timeout)
    jax.distributed.initialize()  # JAX finds its peers by itself


def main() -> None:
  _start_distributed()
  cli.use_compilation_cache()
  from alexnet_jax.training import train  # imported after distributed init, as JAX asks

  try:
    if FLAGS.mode == "eval":
      train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.step)
    else:
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (RuntimeError, ValueError) as e:
    agreement.exit_if_timed_out(e, FLAGS.collective_timeout)
    raise


if __name__ == "__main__":
  cli.run(main, define_flags)
