"""The real engines start the training command: Open MPI's `mpirun -n 2` and `srun -n 2` on a
single-node SLURM (munged, slurmctld and slurmd started here for this machine). The processes
find each other through JAX's own cluster detection (no JAX_* variables, no flags), log how,
and train like one process on the same 2 devices.

Where an engine is missing or its daemons cannot run, the test skips with the reason; under
ALEXNET_JAX_REQUIRE_ENGINES=1 (.ci/run, which installs them) it fails instead.
"""

import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import main_flags, params_of, start

from alexnet_jax.training import metrics

_ENGINES = "Debian: apt-get install openmpi-bin slurm-wlm munge, as root"
_MAIN = (sys.executable, "-m", "alexnet_jax.main")


def unavailable(reason: str):
  """Skips the test for `reason`, or fails it under ALEXNET_JAX_REQUIRE_ENGINES=1."""
  if os.environ.get("ALEXNET_JAX_REQUIRE_ENGINES") == "1":
    pytest.fail(f"ALEXNET_JAX_REQUIRE_ENGINES=1 and {reason}")
  pytest.skip(f"{reason} ({_ENGINES})")


def trains_like_one(launcher, workdir: str, data_dir: str, trained_run: str, found_by: str, env):
  """`launcher` starts 2 processes of 1 CPU device each: they join, each saying so, and end
  with the losses and parameters of `trained_run` (one process, 2 devices, the same steps)."""
  proc = start(main_flags(data_dir, workdir, num_devices=0), devices=1, launcher=launcher, env=env)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  for index in (0, 1):
    line = f"distributed: 2 processes found by {found_by}, this is process {index}, 1 local / "
    assert f"{line}2 global devices" in err, err[-3000:]
  losses = [
    [(r["step"], r["train/loss"]) for r in metrics.read_metrics(run) if "train/loss" in r]
    for run in (workdir, trained_run)
  ]
  assert [s for s, _ in losses[0]] == [s for s, _ in losses[1]] == [1, 2]  # once, by process 0
  np.testing.assert_allclose([v for _, v in losses[0]], [v for _, v in losses[1]], rtol=1e-5)
  # The gradients' all-reduce sums 2 shards over gloo, not in one process: float32 rounding.
  for a, b in zip(jax.tree.leaves(params_of(workdir)), jax.tree.leaves(params_of(trained_run))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="session")
def mpirun() -> str:
  """Open MPI's mpirun. Session-scoped: its absence skips before the trained run is built."""
  path = shutil.which("mpirun")
  if path is None:
    unavailable("mpirun is not installed")
  version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
  if "Open MPI" not in version:  # JAX detects Open MPI's mpirun (up to 4) by itself, not others
    unavailable(f"mpirun is not Open MPI's: {version.strip()[:80]}")
  return path


@pytest.mark.slow
def test_mpirun_of_two_processes_trains_like_one(mpirun, tmp_path, data_dir, trained_run):
  # -x passes the variables to processes on other hosts; here they inherit them anyway.
  launcher = (mpirun, "--allow-run-as-root", "--oversubscribe", "-n", "2", "-x", "XLA_FLAGS")
  launcher += ("-x", "JAX_COMPILATION_CACHE_DIR", *_MAIN)
  trains_like_one(
    launcher, str(tmp_path / "w"), data_dir, trained_run, "Open MPI (OmpiCluster)", {}
  )


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _slurm_conf(folder, host: str) -> str:
  """A single-node SLURM of this host, run by root, its state and logs in `folder`."""
  return f"""ClusterName=alexnet
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={folder}/munge.socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ReturnToService=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=main Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _tail(path, lines: int = 3) -> str:
  try:
    with open(path) as f:
      return " | ".join(line.strip() for line in f.readlines()[-lines:])
  except OSError as e:
    return str(e)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
  """A running single-node SLURM: {"SLURM_CONF": its slurm.conf} for srun, stopped after.
  Session-scoped, like `mpirun`."""
  commands = ("munged", "slurmctld", "slurmd", "srun", "sinfo")
  missing = [c for c in commands if shutil.which(c) is None]
  if missing:
    unavailable(f"{', '.join(missing)} not installed")
  if os.geteuid() != 0:
    unavailable("the SLURM daemons run as root here, and this user is not root")
  host = socket.gethostname().split(".")[0]
  try:
    socket.gethostbyname(host)  # JAX's coordinator: the first host of the step's node list
  except OSError as e:
    unavailable(f"this host's name {host!r} does not resolve ({e})")
  folder = tmp_path_factory.mktemp("slurm")
  (folder / "state").mkdir()
  (folder / "spool").mkdir()
  key = folder / "munge.key"
  key.write_bytes(os.urandom(1024))
  key.chmod(0o400)
  conf = folder / "slurm.conf"
  conf.write_text(_slurm_conf(folder, host))
  env = {**os.environ, "SLURM_CONF": str(conf)}
  munge = ["munged", "--foreground", "--force", f"--socket={folder}/munge.socket"]
  munge += [f"--key-file={key}", f"--log-file={folder}/munged.log"]
  munge += [f"--pid-file={folder}/munged.pid", f"--seed-file={folder}/munged.seed"]
  daemons = [subprocess.Popen(munge, stderr=subprocess.DEVNULL)]
  try:
    time.sleep(0.5)
    for name in ("slurmctld", "slurmd"):
      daemons.append(subprocess.Popen([name, "-D", "-f", str(conf)], env=env, cwd=folder))
    state, deadline = "", time.time() + 30
    while state != "idle" and time.time() < deadline:
      time.sleep(0.5)
      if any(d.poll() is not None for d in daemons):
        break
      sinfo = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
      state = sinfo.stdout.strip() or sinfo.stderr.strip()
    if state != "idle":
      ended = [
        f"{c} exited {d.returncode}" for c, d in zip(commands, daemons) if d.poll() is not None
      ]
      unavailable(
        f"the SLURM node is not idle within 30 s (sinfo: {state!r}; {', '.join(ended)}); "
        f"munged.log: {_tail(folder / 'munged.log')}; "
        f"slurmctld.log: {_tail(folder / 'slurmctld.log')}; "
        f"slurmd.log: {_tail(folder / 'slurmd.log')}"
      )
    yield {"SLURM_CONF": str(conf)}
  finally:
    for daemon in reversed(daemons):
      daemon.terminate()
      try:
        daemon.wait(timeout=30)
      except subprocess.TimeoutExpired:
        daemon.kill()


@pytest.mark.slow
def test_srun_of_two_tasks_trains_like_one(slurm, tmp_path, data_dir, trained_run):
  # --overcommit: 2 tasks on a 1-CPU machine too; a failed task ends the other.
  launcher = ("srun", "-n", "2", "--overcommit", "--kill-on-bad-exit=1", *_MAIN)
  trains_like_one(
    launcher, str(tmp_path / "w"), data_dir, trained_run, "SLURM (SlurmCluster)", slurm
  )
