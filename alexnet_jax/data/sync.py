"""Waiting for the other processes, with a limit: what one process writes for all (the
synthetic set, a TFDS dataset's statistics) is written by process 0 while the others wait at
a barrier. A process that never arrives (crashed, stuck, started with other settings) ends
the wait with a one-line error naming what was awaited, never a hang."""

from __future__ import annotations

import itertools

import jax

from alexnet_jax.core.errors import UserInputError

TIMEOUT_S = 3600  # a TFDS ImageNet sample of 10,000 full-size images takes minutes, not an hour
_calls = itertools.count()  # every process passes the same barriers in the same order


def barrier(what: str, timeout_s: float = TIMEOUT_S) -> None:
  """Returns once every process has called barrier(what); a no-op for one process.

  Raises:
    UserInputError: some process did not arrive within timeout_s.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed

  client = distributed.global_state.client
  if client is None:  # started without jax.distributed (a TPU pod's own runtime): no limit
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(what)
    return
  try:
    client.wait_at_barrier(f"alexnet_jax/{next(_calls)}/{what}", int(timeout_s * 1000))
  except jax.errors.JaxRuntimeError as e:
    lines = str(e).strip().splitlines() or [type(e).__name__]
    why = lines[0].split(". ")[0][:120]  # "DEADLINE_EXCEEDED: Barrier timed out"
    raise UserInputError(
      f"process {jax.process_index()} waited {timeout_s:.0f} s for every process to finish "
      f"{what} ({why}): one crashed or is stuck; see each process's log"
    ) from None
