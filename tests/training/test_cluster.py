"""`--distributed`'s decision: JAX's cluster detection over the variables srun, mpirun and
launch.sh set, as each sets them; a single process is left alone. Nothing joins here: the
decision only (tests/system/test_engines.py runs the real engines)."""

import os

import pytest
from jax._src.clusters import ClusterEnv

from alexnet_jax.core.errors import UserInputError
from alexnet_jax.training import cluster

# The variables JAX's cluster classes read, and those launch.sh sets.
_PREFIXES = ("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "KUBERNETES_")
_JAX = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS")


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch):
  """This test's process outside any cluster, whatever started the suite."""
  for name in list(os.environ):
    if name.startswith(_PREFIXES) or name in _JAX:
      monkeypatch.delenv(name)


def srun_task(monkeypatch, tasks: int, rank: int = 0) -> None:
  """The variables srun sets in task `rank` of a step of `tasks` tasks on 2 nodes."""
  for name, value in {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_NODELIST": "node[001-002]",
    "SLURM_NTASKS": str(tasks),
    "SLURM_PROCID": str(rank),
    "SLURM_LOCALID": str(rank % 2),
  }.items():
    monkeypatch.setenv(name, value)


def mpirun_rank(monkeypatch, size: int, rank: int = 0) -> None:
  """The variables Open MPI 4's mpirun sets in rank `rank` of `size`."""
  monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "3405578240.0;tcp://10.0.0.5,172.17.0.1:41347")
  monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", str(size))
  monkeypatch.setenv("OMPI_COMM_WORLD_RANK", str(rank))
  monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", str(rank))


def decide(mode: str = "auto", address=None, num_processes=None, process_id=None):
  return cluster.decide(mode, cluster.given(address, num_processes, process_id))


def test_a_process_outside_any_cluster_stays_alone():
  assert decide() == cluster.Decision(False, "off (one process, no cluster found)", 1)
  assert decide("off").join is False


def test_a_single_srun_task_is_left_alone(monkeypatch):
  srun_task(monkeypatch, tasks=1)
  assert decide() == cluster.Decision(False, "off (one process, found by SLURM (SlurmCluster))", 1)


def test_a_single_mpirun_rank_is_left_alone(monkeypatch):
  mpirun_rank(monkeypatch, size=1)
  assert not decide().join


def test_srun_of_two_tasks_joins_as_jax_would(monkeypatch):
  srun_task(monkeypatch, tasks=2, rank=1)
  decision = decide()
  assert decision == cluster.Decision(True, "found by SLURM (SlurmCluster)", 2)
  # JAX's own detection, as jax.distributed.initialize() runs it, sees the same processes.
  _, count, index, local = ClusterEnv.auto_detect_unset_distributed_params(
    None, None, None, None, None, 1
  )
  assert (count, index, local) == (2, 1, [1])
  assert cluster.detect() == cluster.Found("SLURM (SlurmCluster)", 2)


def test_mpirun_of_two_ranks_joins(monkeypatch):
  mpirun_rank(monkeypatch, size=2, rank=1)
  assert decide() == cluster.Decision(True, "found by Open MPI (OmpiCluster)", 2)


def test_off_never_joins(monkeypatch):
  srun_task(monkeypatch, tasks=8)
  assert decide("off") == cluster.Decision(False, "off (--distributed=off)", 1)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "0")
  assert not decide("off").join


def test_launch_sh_variables_join_and_win_over_detection(monkeypatch):
  """launch.sh sets JAX's three variables; flags, where given, win over them."""
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:12355")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "3")
  monkeypatch.setenv("JAX_PROCESS_ID", "2")
  assert cluster.given(None, None, None) == cluster.Given("127.0.0.1:12355", 3, 2)
  assert cluster.given("h:1", 4, None) == cluster.Given("h:1", 4, 2)
  srun_task(monkeypatch, tasks=8)
  assert decide().num_processes == 3
  assert decide().how.startswith("given by JAX_COORDINATOR_ADDRESS")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
  assert not decide().join


def test_on_with_nothing_found_is_a_one_line_error():
  with pytest.raises(UserInputError) as e:
    decide("on")
  assert "\n" not in str(e.value)
  assert str(e.value).startswith("--distributed=on: no cluster found and no coordinator address")
  assert "JAX_COORDINATOR_ADDRESS" in str(e.value) and "srun" in str(e.value)


def test_on_joins_a_single_task(monkeypatch):
  srun_task(monkeypatch, tasks=1)
  assert decide("on") == cluster.Decision(True, "found by SLURM (SlurmCluster)", 1)


def test_a_process_count_without_the_rest_is_an_error(monkeypatch):
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  with pytest.raises(UserInputError, match="no coordinator address, process id given"):
    decide()
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(UserInputError, match="JAX_NUM_PROCESSES='two' is not a whole number"):
    decide()


def test_without_jax_cluster_list_auto_joins_on_explicit_settings_only(monkeypatch):
  """A JAX whose private cluster list is gone: auto warns and stays alone under srun."""
  monkeypatch.delattr(ClusterEnv, "_cluster_types")
  srun_task(monkeypatch, tasks=2)
  assert cluster.detect() is None
  assert not decide().join
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:12355")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "0")
  assert decide().join


def test_a_cluster_that_fails_to_answer_is_a_one_line_error(monkeypatch):
  srun_task(monkeypatch, tasks=2)
  monkeypatch.setenv("SLURM_NTASKS", "2(x2)")  # what SLURM_TASKS_PER_NODE looks like
  with pytest.raises(UserInputError, match=r"^distributed: SLURM was detected but could not"):
    decide()
