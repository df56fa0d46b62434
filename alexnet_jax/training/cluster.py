"""Whether this process joins others, decided by JAX's own cluster detection.

`--distributed=auto` (the default) joins JAX's distributed runtime when this process is one
of several: explicit settings (`--coordinator_address`/`--num_processes`/`--process_id`, or
JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID, as launch.sh sets them) name more
than one process, or JAX's cluster detection (Open MPI's mpirun, SLURM's srun, a Cloud TPU VM
pod, GKE, a Kubernetes Job) finds an environment of more than one process. A single process
(`srun -n 1`, `mpirun -n 1`, a laptop) is left alone. `on` always joins (a one-line error
when nothing says how), `off` never does.

The decision asks the same classes, in the same order, that `jax.distributed.initialize()`
asks when it fills in what it is not given, so that what is decided here is what JAX does.
"""

from __future__ import annotations

import os
import socket
import time
from typing import NamedTuple

from absl import logging

from alexnet_jax.core.errors import UserInputError
from alexnet_jax.training import agreement

MODES = ("auto", "on", "off")
# JAX's cluster classes, by the class name: their names for people.
_KNOWN = {
  "OmpiCluster": "Open MPI",
  "SlurmCluster": "SLURM",
  "GkeTpuCluster": "GKE TPU",
  "GceTpuCluster": "Cloud TPU VM",
  "K8sCluster": "Kubernetes",
}
_GIVEN = "JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID (or their flags)"
_HOW_TO = (
  "set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or --coordinator_address, "
  "--num_processes, --process_id), or start the processes with srun, mpirun, on a Cloud TPU VM "
  "pod or as a GKE/Kubernetes indexed Job"
)


class Given(NamedTuple):
  """What the flags or JAX's variables say (None: not said)."""

  address: str | None
  num_processes: int | None
  process_id: int | None

  @property
  def complete(self) -> bool:
    return None not in self


class Found(NamedTuple):
  """The cluster environment JAX's detection sees."""

  label: str  # "Open MPI (OmpiCluster)"
  num_processes: int


class Decision(NamedTuple):
  """Whether to call jax.distributed.initialize, and the words for the log."""

  join: bool
  how: str  # how the processes were found, or why there is one
  num_processes: int


def given(address: str | None, num_processes: int | None, process_id: int | None) -> Given:
  """The flags' values, each one not given read from JAX's variable of the same meaning."""
  env = os.environ.get

  def number(value: int | None, name: str) -> int | None:
    if value is not None or not env(name):
      return value
    try:
      return int(env(name))
    except ValueError:
      raise UserInputError(f"{name}={env(name)!r} is not a whole number") from None

  return Given(
    address or env("JAX_COORDINATOR_ADDRESS") or None,
    number(num_processes, "JAX_NUM_PROCESSES"),
    number(process_id, "JAX_PROCESS_ID"),
  )


def _cluster_types() -> list[type] | None:
  """JAX's cluster environments in the order `jax.distributed.initialize` tries them, those it
  tries unasked only (not mpi4py's, which is opt-in); None where this JAX has no such list.

  A private API (jax._src.clusters.ClusterEnv._cluster_types, the same in jax 0.10 and 0.12):
  JAX exposes no public way to ask what it would detect without joining. Each class is asked
  only through its documented interface (is_env_present, get_process_count),
  so classes JAX adds or renames are asked alike."""
  try:
    from jax._src.clusters import ClusterEnv

    types = list(ClusterEnv._cluster_types)
  except (ImportError, AttributeError):
    return None
  return [t for t in types if not getattr(t, "opt_in_only_method", False)]


def detect() -> Found | None:
  """The first cluster environment JAX's detection finds here, as JAX would choose it."""
  types = _cluster_types()
  if types is None:
    import jax

    logging.warning(
      "distributed: this JAX (%s) has no cluster list to ask; processes join only when "
      "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or their flags) say so",
      jax.__version__,
    )
    return None
  for env in types:
    name = _KNOWN.get(env.__name__, env.__name__)
    try:
      if not env.is_env_present():
        continue
      return Found(f"{name} ({env.__name__})", env.get_process_count())
    except Exception as e:  # noqa: BLE001 - a cluster's own API failing (Kubernetes, metadata)
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise UserInputError(
        f"distributed: {name} was detected but could not say how many processes run ({first}); "
        "fix its setup, or train alone with --distributed=off"
      ) from e
  return None


def decide(mode: str, settings: Given) -> Decision:
  """Whether to join, from `--distributed` (`mode`), the settings given and what JAX detects.

  Given settings win over detected ones, each on its own, as in jax.distributed.initialize."""
  if mode == "off":
    return Decision(False, "off (--distributed=off)", 1)
  found = None if settings.complete else detect()
  count = settings.num_processes
  if count is None and found is not None:
    count = found.num_processes
  if settings.complete:
    how = f"given by {_GIVEN}"
  elif found is not None:
    how = f"found by {found.label}"
  else:
    how = None
  if mode == "auto" and (count is None or count <= 1):
    return Decision(False, f"off (one process, {how or 'no cluster found'})", 1)
  if how is None:  # --distributed=on, or a process count given without the rest
    missing = [n for n, v in zip(("address", "process count", "process id"), settings) if v is None]
    raise UserInputError(
      f"--distributed={mode}: no cluster found and no coordinator {', '.join(missing)} given; "
      + _HOW_TO
    )
  return Decision(True, how, count)


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


def start(
  mode: str, settings: Given, coordinator_timeout: int, collective_timeout: int
) -> Decision:
  """Joins the other processes when `decide` says so, then logs how many processes and devices
  took part and how they were found. Call it before anything starts JAX's backend."""
  import jax

  decision = decide(mode, settings)
  if decision.join:
    agreement.limit_collective_waits(collective_timeout)  # before the backend starts
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only the CPU backend reads it
    address, index = settings.address, settings.process_id
    if address and index is not None and index > 0 and not _reachable(address, coordinator_timeout):
      # The runtime would abort the process with pages of gRPC detail instead.
      raise UserInputError(
        f"process {index} of {decision.num_processes} could not join the coordinator at "
        f"{address} within {coordinator_timeout} s: start process 0 first, and check the "
        "address and port"
      )
    # What is not given, JAX detects itself, asking the classes `detect` asked.
    jax.distributed.initialize(
      coordinator_address=address,
      num_processes=settings.num_processes,
      process_id=index,
      initialization_timeout=coordinator_timeout,
    )
    logging.info(
      "distributed: %d processes %s, this is process %d, %d local / %d global devices",
      jax.process_count(),
      decision.how,
      jax.process_index(),
      jax.local_device_count(),
      jax.device_count(),
    )
  else:
    logging.info("distributed: %s, %d devices", decision.how, jax.device_count())
  return decision
