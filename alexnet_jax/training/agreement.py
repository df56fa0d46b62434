"""Processes that run one job, and that never wait on each other forever.

Started with other flags, each process of a multi-process run would train its own job side by
side with the others until their collective operations stopped matching and one hung. So at
start (`check`), before anything is compiled, every process compares its config and its data
(split sizes, class list, statistics) with every other's; a difference is the same one-line
error on every process, naming the processes, the keys and both values.

After the start, a wait for the other processes ends with a message, not a hang:
`limit_collective_waits` sets XLA:CPU's limit on a collective operation (gloo's all-reduces,
gathers and broadcasts: the train and eval steps, `process_allgather`, `sync_global_devices`),
and `exit_if_timed_out` ends the process with one line for the error it raises.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np

from alexnet_jax.core.errors import UserInputError
from alexnet_jax.training.config_check import same_setting

if TYPE_CHECKING:  # imported by main before JAX's distributed start: no TensorFlow yet
  from alexnet_jax.data.datasets import Data

# Keys that may differ between processes: each host may read its own copy of the data, at
# its own path; the data itself (sizes, classes, statistics) is compared.
PER_PROCESS_KEYS = ("data_dir", "stage_dir")
_SHOWN = 4  # differences named per process in the message, and processes named
_XLA_TIMEOUT_FLAG = "--xla_cpu_collective_timeout_seconds"


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  """{"model.towers": 2, ...}: nested config keys with dotted names."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out |= _flat(value, f"{prefix}{key}.")
    else:
      out[f"{prefix}{key}"] = value
  return out


def _digest(*arrays: Any) -> str:
  h = hashlib.sha256()
  for a in arrays:
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]


def summary(config: ml_collections.ConfigDict, data: Data) -> dict[str, Any]:
  """What every process must agree on, JSON-ready: each config key (but PER_PROCESS_KEYS) and
  the data's sizes, class list and statistics (digests where they are big)."""
  settings = {
    k: json.loads(json.dumps(v, default=repr))
    for k, v in _flat(config.to_dict()).items()
    if k not in PER_PROCESS_KEYS
  }
  stats, classes = data.stats, np.asarray(data.train.classes, str)
  facts = {
    "train_images": len(data.train),
    "val_images": len(data.val),
    "classes": f"{len(classes)} names, sha256 {_digest(classes)}",
    "statistics": f"sha256 {_digest(stats.mean_image, stats.eigval, stats.eigvec)}",
  }
  return {f"--config.{k}": v for k, v in settings.items()} | {
    f"data.{k}": v for k, v in facts.items()
  }


def differences(mine: dict[str, Any], lead: dict[str, Any]) -> list[str]:
  """'KEY=MINE (process 0: LEAD)' for every key whose value differs or is missing on one side."""
  missing = "(none)"
  return [
    f"{key}={_short(mine.get(key, missing))} (process 0: {_short(lead.get(key, missing))})"
    for key in sorted(mine.keys() | lead.keys())
    if not same_setting(mine.get(key, missing), lead.get(key, missing))
  ]


def _short(value: Any, limit: int = 40) -> str:
  text = value if isinstance(value, str) else json.dumps(value)
  return text if len(text) <= limit else text[: limit - 3] + "..."


def disagreement(summaries: list[dict[str, Any]]) -> str | None:
  """The one-line message for the processes whose summary differs from process 0's; None when
  they all agree. The same text on every process: each has every summary."""
  found = [(index, differences(s, summaries[0])) for index, s in enumerate(summaries)]
  found = [(index, diff) for index, diff in found if diff]
  if not found:
    return None
  parts = []
  for index, diff in found[:_SHOWN]:
    more = f" and {len(diff) - _SHOWN} more" if len(diff) > _SHOWN else ""
    parts.append(f"process {index} has {', '.join(diff[:_SHOWN])}{more}")
  if len(found) > _SHOWN:
    parts.append(f"{len(found) - _SHOWN} more processes differ")
  return (
    f"the {len(summaries)} processes do not run the same job: {'; '.join(parts)}; start every "
    "process with the same flags and config, on the same data"
  )


def _allgather_json(value: Any) -> list[Any]:
  """`value` of every process, in process order (two small collectives: sizes, then bytes)."""
  from jax.experimental import multihost_utils

  raw = np.frombuffer(json.dumps(value, sort_keys=True).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(raw.size))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[: raw.size] = raw
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row[:size])) for row, size in zip(rows, sizes)]


def check(config: ml_collections.ConfigDict, data: Data) -> None:
  """Refuses to start unless every process has process 0's config and data; a no-op for one
  process. Call it on every process, before compiling.

  Raises:
    UserInputError: on every process alike, naming what differs.
  """
  if jax.process_count() == 1:
    return
  message = disagreement(_allgather_json(summary(config, data)))
  if message:
    raise UserInputError(message)


def limit_collective_waits(seconds: int) -> None:
  """Sets XLA:CPU's limit on a collective operation (XLA's default: 30 minutes) to `seconds`
  in XLA_FLAGS, unless it names one already. XLA reads it once, when the backend starts: call
  this before then."""
  flags = os.environ.get("XLA_FLAGS", "")
  if _XLA_TIMEOUT_FLAG not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {_XLA_TIMEOUT_FLAG}={seconds}".strip()


def timed_out_message(error: BaseException, seconds: int) -> str | None:
  """One line for an error raised by a wait for the other processes that ran out of time (a
  collective operation, or a barrier of the distributed runtime); None for any other error."""
  text = str(error)
  # XLA's errors reach Python as JaxRuntimeError, or as ValueError from a gathered array.
  if not isinstance(error, (RuntimeError, ValueError)) or not (
    "Timed out waiting" in text or "DEADLINE_EXCEEDED" in text
  ):
    return None
  first = text.strip().splitlines()[0][:200]
  return (
    f"process {jax.process_index()} of {jax.process_count()} waited too long for the others "
    f"({first}): another process stopped, hung or runs something else; see its log. The "
    f"limit on a collective operation is --collective_timeout={seconds} s"
  )


def exit_if_timed_out(error: BaseException, seconds: int) -> None:
  """Ends the process with `timed_out_message` as its one line, if there is one. At once: JAX's
  shutdown would first wait for the process that did not come."""
  message = timed_out_message(error, seconds)
  if message is not None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(1)
