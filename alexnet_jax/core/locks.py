"""One owner at a time for a folder: a training run's workdir, a `prepare`'s data dir.

Two runs writing one workdir interleave checkpoints and metrics lines and leave temporary
folders behind; the second gets a one-line error instead, before it touches anything. The
lock is a file in the folder naming its owner (host, pid, the process's start, the time and
command), created with O_CREAT|O_EXCL: atomic on local file systems and on NFS (v3 and
later), so of two runs starting together exactly one gets it. It is removed when the owner
ends. One left by a process that died on this host (its pid gone, or reused by a process that
started at another time or before a reboot) is taken over with a warning; one of another host
cannot be checked from here, so the error says how to remove it if that run is gone.

In a bucket (gs://) the lock is created with the store's create-if-absent (GCS: a write that
succeeds only if no object has the name), atomic like O_EXCL. A bucket has no rename: a stale
lock there is deleted and created anew, and two runs taking over one stale lock in the same
second could both succeed; stale locks are those of dead processes of this host, so that
needs two runs started together on one host after a crash.
"""

from __future__ import annotations

import datetime
import functools
import inspect
import json
import os
import socket
import sys
import threading
import time
from typing import Callable

from absl import logging

from alexnet_jax.core import storage
from alexnet_jax.core.errors import UserInputError

LOCK_FILE = "alexnet_jax.lock"
_HELD: dict[str, "Lock"] = {}  # the locks this process holds, by path
_GUARD = threading.Lock()


def _boot_id() -> str | None:
  """This boot of this machine (Linux): a pid recorded before a reboot names no process now."""
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return None


def _process_start(pid: int) -> int | None:
  """When process `pid` started, in clock ticks since boot (Linux; None elsewhere or if gone):
  tells a live owner from a later process that got its pid."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return int(f.read().rsplit(")", 1)[1].split()[19])
  except (OSError, IndexError, ValueError):
    return None


def _me() -> dict:
  pid = os.getpid()
  return {
    "host": socket.gethostname(),
    "pid": pid,
    "process_start": _process_start(pid),
    "boot_id": _boot_id(),
    "since": datetime.datetime.now().isoformat(timespec="seconds"),
    "command": " ".join(sys.argv),
  }


def _pid_alive(pid: int) -> bool:
  """Whether `pid` runs: a killed process its parent has not reaped yet (a zombie, state Z in
  Linux's /proc) still answers signals but holds nothing."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process: alive
    pass
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except (OSError, IndexError):
    return True


def _is_stale(owner: dict) -> bool:
  """Whether the owner is certainly gone: a process of this host that no longer runs. Another
  host's process cannot be checked from here."""
  if owner.get("host") != socket.gethostname():
    return False
  if owner.get("boot_id") and owner["boot_id"] != _boot_id():
    return True  # this machine rebooted since
  pid = owner.get("pid")
  if not isinstance(pid, int) or not _pid_alive(pid):
    return True
  started = owner.get("process_start")
  return started is not None and _process_start(pid) not in (None, started)


def _read(path: str) -> dict | None:
  """The owner a lock file names; {} if unreadable (being written, or damaged); None if gone."""
  try:
    owner = json.loads(storage.path(path).read_text())
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}
  return owner if isinstance(owner, dict) else {}


def _create(path: str, owner: dict) -> bool:
  """Creates the lock file naming `owner`; False if it exists (O_EXCL: one creator wins)."""
  if storage.is_remote(path):
    fs, name = storage.filesystem(path)
    try:
      fs.pipe_file(name, json.dumps(owner).encode(), mode="create")
    except FileExistsError:
      return False
    return True
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  try:
    os.write(fd, json.dumps(owner).encode())
    os.fsync(fd)
  finally:
    os.close(fd)
  return True


def _take_over(path: str, stale: dict) -> None:
  """Removes a stale lock, unless another run replaced it meanwhile: it is renamed to a name of
  our own first (atomic), and put back if it is no longer the stale one. A bucket cannot
  rename: there the stale lock is deleted if it still names the stale owner."""
  if storage.is_remote(path):
    if _read(path) == stale:
      storage.path(path).unlink(missing_ok=True)
    return
  aside = f"{path}.stale.{socket.gethostname()}.{os.getpid()}.{os.urandom(4).hex()}"
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return  # another run took it over first: the next try sees its lock
  if _read(aside) == stale:
    os.remove(aside)
    return
  try:
    os.link(aside, path)  # a live run's lock: back in place (fails if a third run has one)
  except OSError:
    pass
  os.remove(aside)


def _describe(owner: dict) -> str:
  if not owner:
    return "an unknown process (its lock file is empty or damaged)"
  what = f"pid {owner.get('pid')} on host {owner.get('host')}, since {owner.get('since')}"
  return f"{what} ({owner['command']})" if owner.get("command") else what


class Lock:
  """This process's hold on a folder; `release` (or the end of a `with` block) removes it."""

  def __init__(self, path: str, owner: dict):
    self.path, self.owner, self._depth = path, owner, 1

  def release(self) -> None:
    with _GUARD:
      self._depth -= 1
      if self._depth:
        return
      del _HELD[self.path]
    if _read(self.path) == self.owner:  # never another run's lock that replaced ours
      storage.path(self.path).unlink(missing_ok=True)

  def __enter__(self) -> "Lock":
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def take(folder: str, what: str, hint: str) -> Lock:
  """Makes `folder` (if need be) and locks it for this process: nothing else is touched before.

  Args:
    folder: the folder to own.
    what: its name in the error ("workdir", "data dir").
    hint: the way out in the error ("use another --workdir").

  Returns:
    The lock; taking it again in the same thread (a job calling another that locks the same
    folder) gives the same lock, held until its last release.

  Raises:
    UserInputError: another live process (or another host's) holds the folder.
  """
  folder = storage.absolute(folder)
  path = storage.join(folder, LOCK_FILE)
  with _GUARD:
    held = _HELD.get(path)
    if held is not None and held.owner.get("thread") == threading.get_ident():
      held._depth += 1
      return held
  storage.path(folder).mkdir(parents=True, exist_ok=True)
  me = _me() | {"thread": threading.get_ident()}
  owner = {}
  for attempt in range(3):  # after a stale lock's take-over, or one that vanished or was empty
    if _create(path, me):
      with _GUARD:
        _HELD[path] = Lock(path, me)
        return _HELD[path]
    owner = _read(path)
    if owner == {} and not attempt:
      time.sleep(0.5)  # its owner may be writing it right now
    elif owner and _is_stale(owner):
      logging.warning(
        "taking over the lock of %s %s: %s is no longer running", what, folder, _describe(owner)
      )
      _take_over(path, owner)
    elif owner is not None:
      break
  here = owner and owner.get("host") == socket.gethostname()  # alive: checked above
  remove = "" if here else f"; if that run is gone, remove {path}"
  raise UserInputError(f"{what} {folder} is in use by {_describe(owner)}: {hint}{remove}")


def hold(folder_arg: str, what: str, hint: str) -> Callable:
  """A decorator: the function holds the lock of its argument `folder_arg` while it runs."""

  def decorate(fn: Callable) -> Callable:
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def run(*args, **kwargs):
      folder = signature.bind(*args, **kwargs).arguments[folder_arg]
      with take(folder, what, hint):
        return fn(*args, **kwargs)

    return run

  return decorate
