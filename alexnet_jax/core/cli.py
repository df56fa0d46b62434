"""One shape for every command: `python -m alexnet_jax.NAME` and `python benchmarks/NAME.py`.

Each command module ends alike:

  def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "...")

  def main() -> None:
    ...  # reads flags.FLAGS.workdir; raises UserInputError for bad input

  if __name__ == "__main__":
    cli.run(main, define_flags)

`run` defines the flags, parses them, refuses positional arguments, drops orbax's INFO
narration (its warnings stay) and calls `main()`. What the user got wrong is one line on
stderr, `error: ...`, and exit status 1, never a traceback: a bad flag or flag value, a
missing `--config` file, an unknown `--config.KEY`, an argument that is not a flag, and
a `UserInputError` raised by `main`.

Flags are defined in each command's `define_flags()`, which `run` calls, and read from
`flags.FLAGS` in `main`; never at import. The command modules are libraries too
(paper_figures imports extract, the benchmarks import bench, prepare and each other, tests
import them all), and absl refuses a flag name that a second module defines (workdir,
step, output, batch_size, rounds...): module-level definitions would make those imports
fail with DuplicateFlagError, or define one command's flags in another. Defined by `run`,
only in the process the command runs in, the command has exactly its own flags and an
import defines none.

This module imports neither JAX nor ml_collections: it must not start JAX's backend before
the command has set it up (`simulate_cpu_devices`), and the benchmarks load no configs.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import sys
from typing import Callable, Sequence

from absl import app, flags
from absl import logging as absl_logging

from alexnet_jax.core.errors import UserInputError


class QuietOrbax(logging.Filter):
  """Orbax narrates every save and restore at INFO: keep its warnings, drop the narration."""

  def filter(self, record: logging.LogRecord) -> bool:
    path = record.pathname.replace(os.sep, "/")
    return record.levelno >= logging.WARNING or "/orbax/" not in path


def one_line(message: str) -> str:
  """`message` on one line: its first and last lines when it spans several (a traceback)."""
  lines = [line.strip() for line in message.splitlines() if line.strip()] or [""]
  return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def _config_files(argv: Sequence[str]) -> dict[str, str]:
  """{name: file} of the ml_collections config-file flags, when ml_collections is in use."""
  if "ml_collections.config_flags" not in sys.modules:
    return {}
  from ml_collections import config_flags

  files = {}
  for name in flags.FLAGS:
    try:
      files[name] = config_flags.get_config_filename(flags.FLAGS[name])
    except TypeError:  # not a config flag
      pass
    except flags.Error:  # its parse failed: the file is the one on the command line
      given = [b for a, b in zip(argv, argv[1:]) if a == f"--{name}"]
      given += [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
      files.update({name: given[-1]} if given else {})
  return files


def _exit_if_config_missing(argv: Sequence[str]) -> None:
  """ml_collections loads a missing config file lazily, raising where it is first used."""
  for name, path in _config_files(argv).items():
    if not os.path.isfile(path.split(":", 1)[0]):
      sys.exit(f"error: --{name}={path}: no such config file")


def _exit_for_flag_error(error: Exception, argv: Sequence[str]) -> None:
  """Exits with one line for what defining or parsing the flags raised; re-raises a bug.

  ml_collections reports an unknown --config.KEY as a KeyError wrapped in an AttributeError,
  while defining the flag (the default file's keys) or while parsing (those of --config's)."""
  _exit_if_config_missing(argv)
  if isinstance(error, (flags.Error, OSError)):
    sys.exit(f"error: {one_line(str(error))}")
  overrides = [a for a in argv if _OVERRIDE.match(a)]
  if not overrides:
    raise error
  # The message is the key, then ml_collections' suggestion, quoted once per wrapping.
  text = str(error)
  while text[:1] in ("'", '"'):
    try:
      text = str(ast.literal_eval(text))
    except (ValueError, SyntaxError):
      break
  lines = [line.strip().strip("\"'") for line in text.splitlines() if line.strip()] or [""]
  hint = f" ({lines[1][0].lower()}{lines[1][1:]})" if len(lines) > 1 else ""
  sys.exit(
    f"error: unknown config key '{lines[0]}' in {' '.join(overrides)}{hint}; "
    "the keys are those of the config file's get_config()"
  )


_FLAG_ERRORS = (flags.Error, AttributeError, KeyError, OSError)
_OVERRIDE = re.compile(r"^--?(no)?[A-Za-z_]\w*\.")  # --config.KEY=VALUE


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's parser, with every error one line: a bad flag or value, a missing config file,
  an unknown --config.KEY."""
  try:
    rest = flags.FLAGS(list(argv))
  except _FLAG_ERRORS as e:
    _exit_for_flag_error(e, argv)
    raise
  _exit_if_config_missing(argv)
  return rest


def simulate_cpu_devices(count: int) -> None:
  """Makes JAX's CPU backend `count` devices (unless XLA_FLAGS already sets a count), so
  that meshes run on a CPU host; accelerators are untouched. JAX reads XLA_FLAGS when its
  backend starts: call this in `main`, before the first use of devices, never at import."""
  current = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in current:
    os.environ["XLA_FLAGS"] = f"{current} --xla_force_host_platform_device_count={count}".strip()


def run(
  main: Callable[[], object],
  define_flags: Callable[[], object] | None = None,
  argv: Sequence[str] | None = None,
) -> None:
  """Runs `main()` as the process's command (see the module docstring), then exits.

  `define_flags()` defines the command's flags; `argv` defaults to sys.argv (ml_collections'
  config flags read sys.argv whatever `argv` is)."""
  argv = list(sys.argv if argv is None else argv)
  if define_flags is not None:
    try:
      define_flags()  # a config flag's default file is loaded here, --config.KEY applied
    except _FLAG_ERRORS as e:
      _exit_for_flag_error(e, argv)
      raise

  def command(args: list[str]) -> None:
    if len(args) > 1:
      sys.exit(
        f"error: unexpected arguments: {' '.join(args[1:])} (every option is a --flag; see --help)"
      )
    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, QuietOrbax) for f in handler.filters):
      handler.addFilter(QuietOrbax())
    try:
      main()
    except UserInputError as e:
      sys.exit(f"error: {' '.join(str(e).splitlines())}")

  app.run(command, argv=argv, flags_parser=parse_flags)


# XLA's persistent compilation cache for the commands that train (main, experiments): a
# restarted or resumed run, the same config in another workdir, a suite's next seed skip
# compiling their steps again. JAX_COMPILATION_CACHE_DIR chooses another folder.
DEFAULT_COMPILATION_CACHE = os.path.join("~", ".cache", "alexnet_jax", "xla")


def use_compilation_cache() -> str:
  """Turns XLA's persistent compilation cache on (unless a folder is already set); returns it."""
  import jax

  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(DEFAULT_COMPILATION_CACHE))
  return jax.config.jax_compilation_cache_dir
