"""Training and evaluation, the package's main command:

  python -m alexnet_jax.main --config=configs/default.py --workdir=DIR [--mode=eval]
    [--config.KEY=VALUE ...]

Only flags here: the work is `training.train.train_and_evaluate` and
`training.train.evaluate_checkpoint`.
"""

from absl import flags

from alexnet_jax.core import cli
from alexnet_jax.training import agreement, cluster

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
  flags.DEFINE_enum(
    "distributed",
    "auto",
    list(cluster.MODES),
    "Join other processes: auto (when JAX detects several: SLURM, Open MPI, a TPU pod, GKE, or "
    "JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES>1), on (always), off (never). docs/clusters.md",
  )
  flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS)."
  )
  flags.DEFINE_integer("num_processes", None, "Number of processes (default: $JAX_NUM_PROCESSES).")
  flags.DEFINE_integer("process_id", None, "This process's index (default: $JAX_PROCESS_ID).")
  flags.DEFINE_integer("coordinator_timeout", 300, "Seconds to wait for all processes to join.")
  flags.DEFINE_integer(
    "collective_timeout",
    600,
    "Several processes on CPUs: seconds one collective operation waits for the others.",
  )


def main() -> None:
  cli.use_compilation_cache()
  settings = cluster.given(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  cluster.start(FLAGS.distributed, settings, FLAGS.coordinator_timeout, FLAGS.collective_timeout)
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
