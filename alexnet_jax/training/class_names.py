"""WORKDIR/classes.json: the class names a run's labels index, written when it starts, so that
extraction and reports name predictions without opening (or generating) the dataset again."""

from __future__ import annotations

import json
from typing import Sequence

from alexnet_jax.core import files, storage

FILE = "classes.json"


def write(workdir: str, classes: Sequence[str]) -> None:
  files.write_text(storage.join(workdir, FILE), json.dumps(list(classes), indent=0) + "\n")


def read(workdir: str) -> tuple[str, ...] | None:
  """The run's class names, or None for a run that did not record them."""
  path = storage.path(workdir).joinpath(FILE)
  if not path.exists():
    return None
  return tuple(json.loads(path.read_text()))
