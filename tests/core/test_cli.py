"""The commands' shared shape (`core.cli`): one-line errors, flags only defined to run."""

import ast
import logging
import os
import pathlib
import subprocess
import sys

import pytest
from absl import flags
from absl import logging as absl_logging

from alexnet_jax.core import cli
from alexnet_jax.core.errors import UserInputError

ROOT = pathlib.Path(__file__).resolve().parents[2]


def command(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
  )


@pytest.fixture(autouse=True)
def logging_as_it_was():
  """`cli.run` in this process sets up absl's logging (app.run): undone for the other tests."""
  root, absl_logger = logging.getLogger(), logging.getLogger("absl")
  levels, handlers = (root.level, absl_logger.level), list(root.handlers)
  yield
  root.setLevel(levels[0])
  absl_logger.setLevel(levels[1])
  for handler in [h for h in root.handlers if h not in handlers]:
    if isinstance(handler, absl_logging.ABSLHandler):
      root.removeHandler(handler)


def run_in_process(capsys, main, argv=("prog",), define_flags=None) -> tuple[object, str, str]:
  """cli.run in this process: (exit status, stdout, stderr) as the process would end."""
  with pytest.raises(SystemExit) as exit_:
    cli.run(main, define_flags, argv=list(argv))
  out, err = capsys.readouterr()
  code = exit_.value.code
  if isinstance(code, str):  # what the interpreter does with sys.exit("message")
    code, err = 1, err + code + "\n"
  return code, out, err


def assert_one_error_line(code, err: str, expected: str | None = None) -> str:
  lines = err.strip().splitlines()
  assert code not in (0, None) and len(lines) == 1 and lines[0].startswith("error: "), err
  assert expected is None or lines[0] == expected
  return lines[0]


@pytest.mark.parametrize(
  "args",
  [
    ["--config=configs/missing.py"],
    ["--config=configs/missing.py", "--config.seed=3"],  # ml_collections fails elsewhere then
    ["--config", "configs/missing.py"],
  ],
  ids=["alone", "with_override", "space"],
)
def test_a_missing_config_file_is_one_line(args, tmp_path):
  out = command("-m", "alexnet_jax.main", *args, f"--workdir={tmp_path}")
  assert_one_error_line(
    out.returncode, out.stderr, "error: --config=configs/missing.py: no such config file"
  )
  assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
  "args, key, hint",
  [
    (["--config=configs/quickstart.py", "--config.no_such_key=3"], "no_such_key", ""),
    (["--config.model.no_such_key=3"], "no_such_key", ""),  # the default file's, while defining
    (
      ["--config.num_train_stepz=3"],
      "num_train_stepz",
      ' (did you mean "num_train_steps" instead of "num_train_stepz"?)',
    ),
  ],
  ids=["given_config", "default_config", "near_miss"],
)
def test_an_unknown_config_key_is_one_line(args, key, hint, tmp_path):
  out = command("-m", "alexnet_jax.main", f"--workdir={tmp_path}", *args)
  assert_one_error_line(
    out.returncode,
    out.stderr,
    f"error: unknown config key '{key}' in {args[-1]}{hint}; "
    "the keys are those of the config file's get_config()",
  )


def test_a_user_input_error_is_one_line(capsys):
  def main():
    print("started")
    raise UserInputError("the workdir is empty:\ntrain first")

  code, out, err = run_in_process(capsys, main)
  assert out == "started\n"
  assert_one_error_line(code, err, "error: the workdir is empty: train first")


def test_another_error_keeps_its_traceback(capsys):
  def main():
    raise RuntimeError("a bug")

  with pytest.raises(RuntimeError, match="a bug"):
    cli.run(main, argv=["prog"])


def test_positional_arguments_are_refused(capsys):
  ran = []
  code, _, err = run_in_process(capsys, lambda: ran.append(1), ["prog", "train", "now"])
  line = assert_one_error_line(code, err)
  assert line.startswith("error: unexpected arguments: train now") and not ran


def define_count() -> None:
  if "cli_test_count" not in flags.FLAGS:
    flags.DEFINE_integer("cli_test_count", 1, "A count.")


def test_flags_are_parsed_and_a_bad_value_is_one_line(capsys):
  seen = []
  main = lambda: seen.append(flags.FLAGS.cli_test_count)
  code, _, err = run_in_process(capsys, main, ["prog", "--cli_test_count=3"], define_count)
  assert code in (0, None) and seen == [3] and err == ""
  code, _, err = run_in_process(capsys, main, ["prog", "--cli_test_count=three"], define_count)
  line = assert_one_error_line(code, err)
  assert line.startswith("error: flag --cli_test_count=three:") and seen == [3]
  code, _, err = run_in_process(capsys, main, ["prog", "--cli_test_cuont=3"], define_count)
  assert "Unknown command line flag 'cli_test_cuont'" in assert_one_error_line(code, err)


def test_orbax_narration_is_dropped_and_its_warnings_kept():
  def record(level, path):
    return logging.LogRecord("absl", level, path, 1, "saved", None, None)

  quiet = cli.QuietOrbax()
  orbax = "/venv/site-packages/orbax/checkpoint/checkpoint_manager.py"
  assert not quiet.filter(record(logging.INFO, orbax))
  assert quiet.filter(record(logging.WARNING, orbax))
  assert quiet.filter(record(logging.INFO, "/repo/alexnet_jax/train.py"))


def test_a_multi_line_message_becomes_one_line():
  assert cli.one_line("flag --config: Error:\n\n  Traceback ...\n  ValueError: bad\n") == (
    "flag --config: Error: ... ValueError: bad"
  )


def test_simulated_devices_keep_a_count_already_set(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  cli.simulate_cpu_devices(2)
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  cli.simulate_cpu_devices(2)
  assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2"


def test_importing_bench_leaves_xla_flags_and_devices_to_main():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  script = (
    "import os\n"
    "import alexnet_jax.bench\n"
    "assert 'XLA_FLAGS' not in os.environ, os.environ['XLA_FLAGS']\n"
    "from alexnet_jax.core import cli\n"
    "cli.simulate_cpu_devices(2)  # after the imports, as bench's main does\n"
    "import jax\n"
    "assert jax.device_count() == 2, jax.devices()\n"
  )
  out = command("-c", script, env=dict(env, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]


def define_flags_calls(tree: ast.Module) -> list[str]:
  """Where `*.DEFINE_*(...)` is called: the enclosing function's name, or '<module>'."""
  found = []

  def visit(node, where):
    for child in ast.iter_child_nodes(node):
      inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else where
      if (
        isinstance(child, ast.Call)
        and isinstance(child.func, ast.Attribute)
        and child.func.attr.startswith("DEFINE_")
      ):
        found.append(where)
      visit(child, inner)

  visit(tree, "<module>")
  return found


def test_the_shape_finder_sees_a_module_level_flag():
  tree = ast.parse("flags.DEFINE_string('a', None, '')\ndef define_flags():\n  flags.DEFINE_bool()")
  assert define_flags_calls(tree) == ["<module>", "define_flags"]


COMMANDS = sorted(
  str(p.relative_to(ROOT))
  for folder in ("alexnet_jax", "benchmarks")
  for p in (ROOT / folder).glob("*.py")
  if define_flags_calls(ast.parse(p.read_text()))
)


def test_the_commands_are_found():
  assert {"alexnet_jax/main.py", "alexnet_jax/bench.py", "benchmarks/end_to_end.py"} < set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS)
def test_every_command_defines_its_flags_only_to_run(path):
  """Importing a command module defines no flag (a module-level DEFINE_ would collide with
  another command's same-named flag on import), and it runs through cli.run."""
  text = (ROOT / path).read_text()
  assert set(define_flags_calls(ast.parse(text))) == {"define_flags"}
  assert text.rstrip().endswith('if __name__ == "__main__":\n  cli.run(main, define_flags)')


def test_training_runs_keep_a_compilation_cache():
  """main and experiments turn XLA's persistent cache on (restarts skip compiling), unless a
  folder is set."""
  import jax

  before = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    default = os.path.expanduser(cli.DEFAULT_COMPILATION_CACHE)
    assert cli.use_compilation_cache() == default == jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", "/elsewhere")
    assert cli.use_compilation_cache() == "/elsewhere"
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
