"""python -m alexnet_jax.main --config=configs/default.py --workdir=DIR [--mode=eval] [--config.KEY=VALUE ...]"""

import logging
import os
import socket
import sys
import time

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", "configs/quickstart.py", "Config file (get_config()).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Where checkpoints, metrics and the config go.", required=True
)
_MODE = flags.DEFINE_enum(
  "mode", "train", ["train", "eval"], "train (resuming if possible), or evaluate a checkpoint."
)
_STEP = flags.DEFINE_integer(
  "step", None, "With --mode=eval: the checkpoint step (default: the latest)."
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  os.environ.get("JAX_COORDINATOR_ADDRESS"),
  "host:port of process 0, for multi-process runs.",
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", int(os.environ.get("JAX_NUM_PROCESSES", 1)), "Number of processes."
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", int(os.environ.get("JAX_PROCESS_ID", 0)), "This process's index."
)
_TIMEOUT = flags.DEFINE_integer(
  "coordinator_timeout", 300, "Seconds to wait for all processes to join."
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

  if _COORDINATOR.value and _NUM_PROCESSES.value > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only the CPU backend reads it
    if _PROCESS_ID.value != 0 and not _reachable(_COORDINATOR.value, _TIMEOUT.value):
      # The runtime would abort the process with pages of gRPC detail instead.
      sys.exit(
        f"error: process {_PROCESS_ID.value} of {_NUM_PROCESSES.value} could not join the coordinator at "
        f"{_COORDINATOR.value} within {_TIMEOUT.value} s: start process 0 first, and check the address and port"
      )
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
      initialization_timeout=_TIMEOUT.value,
    )
  elif (
    int(os.environ.get("SLURM_NTASKS", "1")) > 1
    or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
  ):
    jax.distributed.initialize()  # JAX finds its peers by itself


class _QuietCheckpointing(logging.Filter):
  """Orbax narrates every save at INFO; keep its warnings, drop the narration."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  absl_logging.get_absl_handler().addFilter(_QuietCheckpointing())
  _start_distributed()
  from alexnet_jax import train  # imported after distributed init, as JAX asks
  from alexnet_jax.errors import UserInputError

  try:
    if _MODE.value == "eval":
      train.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, _STEP.value)
    else:
      train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except UserInputError as e:
    sys.exit(f"error: {e}")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with an unknown --config.KEY reported in one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    bad = [a for a in argv if a.startswith("--config.")]
    key = str(e).strip("\"'")
    sys.exit(
      f"error: unknown config key '{key}' in {' '.join(bad)}; the keys are those of the config file's get_config()"
    )
  except flags.Error as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
