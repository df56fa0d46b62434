"""The docs say only what runs: every command line in README.md and docs/*.md names a command
that exists, with flags that command defines and config keys its config has; every link and
every repository path or module they name exists.

What is checked, in ```bash blocks and in inline `code` spans:
- `python -m alexnet_jax.X ...`: alexnet_jax/X.py is a command (it has `define_flags`); each
  --flag is one it defines (or absl's own: --help, --verbosity, ...), --noFLAG only for a
  boolean, an enum's literal value one of its choices, no positional argument (the commands
  refuse them); --config.KEY=VALUE names a key (nested too: --config.model.towers) of the
  get_config() of the file given by --config (or the command's default config file).
- `./launch.sh ...` takes main's flags; `python benchmarks/X.py ...` takes that script's;
  `bash FILE`, `pip install -r FILE` and `python -m pytest PATH` name files that exist.
- A standalone `--config.KEY=VALUE` span names a key of configs/default.py.
- Links [text](target) to files of the repository exist, and so do their #anchors in .md files.
- Inline `alexnet_jax/...`, `configs/...`, `tests/...` (and other top-level folders') paths
  exist, and dotted `alexnet_jax.part.module.name` references name a module and, after it, a
  name that module defines; so do the imports of ```python blocks. In a section whose
  heading says "moved", a table's first column (the old names) is left out.

Everything is read with ast and regular expressions: no command module is imported (several
import TensorFlow) and nothing is compiled. Only configs/*.py are imported, for their keys.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import pathlib
import re
import shlex
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 170  # the front door: the reference lives in docs/

# Flags absl defines in every command (app.run's help flags, FlagValues' own, absl.logging's).
ABSL_FLAGS = {
  "help",
  "helpshort",
  "helpfull",
  "helpxml",
  "flagfile",
  "undefok",
  "alsologtostderr",
  "log_dir",
  "logger_levels",
  "logtostderr",
  "only_check_args",
  "pdb",
  "pdb_post_mortem",
  "profile_file",
  "run_with_pdb",
  "run_with_profiling",
  "showprefixforinfo",
  "stderrthreshold",
  "use_cprofile_for_profiling",
  "v",
  "verbosity",
}
TOP_LEVEL = ("alexnet_jax", "configs", "benchmarks", "tests", "docs", "notebooks", ".ci")
PATH_SPAN = re.compile(
  r"^(?:(?:%s)/[\w./*-]*|launch\.sh|requirements(?:-dev)?\.txt|pyproject\.toml)$"
  % "|".join(re.escape(t) for t in TOP_LEVEL)
)
DOTTED = re.compile(r"\balexnet_jax(?:\.\w+)+")
FENCE = re.compile(r"^```(\w*)\s*$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SPAN = re.compile(r"`([^`]+)`")
PLACEHOLDER = re.compile(r"[A-Z]{2,}|\.\.\.|[<>{}|]")  # DIR, N, ..., <part>, a|b


# What a command defines, read from its source.


@dataclasses.dataclass(frozen=True)
class Flag:
  kind: str  # the DEFINE_ function: string, integer, bool, enum, config_file, ...
  choices: tuple[str, ...] | None = None  # an enum's literal choices
  default: str | None = None  # a config file flag's default file


@functools.cache
def defined_flags(path: pathlib.Path) -> dict[str, Flag] | None:
  """{name: Flag} of the flags `define_flags()` in the file at path defines; None when the
  file has no define_flags (it is not a command)."""
  tree = ast.parse(path.read_text())
  functions = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "define_flags"]
  if not functions:
    return None
  found = {}
  for node in ast.walk(functions[0]):
    if not (
      isinstance(node, ast.Call)
      and isinstance(node.func, ast.Attribute)
      and node.func.attr.startswith("DEFINE_")
    ):
      continue
    name = node.args[0] if node.args else {k.arg: k.value for k in node.keywords}.get("name")
    if not isinstance(name, ast.Constant):
      continue
    kind = node.func.attr[len("DEFINE_") :]
    choices = default = None
    if kind == "enum" and len(node.args) > 2 and isinstance(node.args[2], (ast.List, ast.Tuple)):
      choices = tuple(e.value for e in node.args[2].elts if isinstance(e, ast.Constant))
    if kind == "config_file" and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
      default = node.args[1].value
    found[name.value] = Flag(kind, choices, default)
  return found


@functools.cache
def config_of(path: str):
  """get_config() of configs/NAME.py (path relative to the repository)."""
  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
  module = importlib.import_module(".".join(pathlib.PurePath(path).with_suffix("").parts))
  return module.get_config()


def config_key_problem(config_file: str, key: str) -> str | None:
  """Why --config.KEY is not a key of config_file's get_config(), or None."""
  try:
    node = config_of(config_file)
  except Exception as e:  # a config that does not load is the doc's problem to report
    return f"{config_file} does not load: {e!r}"
  for i, part in enumerate(key.split(".")):
    if not hasattr(node, "keys") or part not in node:
      return f"--config.{key}: {config_file} has no key {'.'.join(key.split('.')[: i + 1])!r}"
    node = node[part]
  return None


# Command lines in a document.


@dataclasses.dataclass(frozen=True)
class Command:
  line: int
  text: str


def strip_comment(line: str) -> str:
  return re.split(r"(?:^|\s)#", line, maxsplit=1)[0]


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
  """(language, first line number, lines) of every fenced block."""
  blocks, lang, start, body = [], None, 0, []
  for number, line in enumerate(text.splitlines(), 1):
    m = FENCE.match(line.strip())
    if lang is None and m:
      lang, start, body = m.group(1), number + 1, []
    elif lang is not None and line.strip() == "```":
      blocks.append((lang, start, body))
      lang = None
    elif lang is not None:
      body.append(line)
  return blocks


def prose(text: str) -> str:
  """text with every fenced block's lines blanked (line numbers kept), and in a section whose
  heading says "moved", each table row's first cell blanked: the old names it lists."""
  out, fenced, moved = [], False, False
  for line in text.splitlines():
    stripped = line.strip()
    if FENCE.match(stripped) or (fenced and stripped == "```"):
      fenced = not fenced
      out.append("")
      continue
    if fenced:
      out.append("")
      continue
    if stripped.startswith("#"):
      moved = "moved" in stripped.lower()
    if moved and stripped.startswith("|"):
      cells = stripped.split("|")
      line = "|".join(cells[:1] + [""] + cells[2:])
    out.append(line)
  return "\n".join(out)


def line_of(text: str, offset: int) -> int:
  return text.count("\n", 0, offset) + 1


def inline_spans(text: str) -> list[tuple[int, str]]:
  """(line, span with its whitespace made single spaces) of every `code` span outside fenced
  blocks; a span may wrap onto the next line, as markdown allows."""
  body = prose(text)
  return [(line_of(body, m.start()), " ".join(m.group(1).split())) for m in SPAN.finditer(body)]


COMMAND_START = re.compile(r"(?:python3? -m alexnet_jax\.|python3? benchmarks/|\./launch\.sh)")


def commands(text: str) -> list[Command]:
  """Every command line: ```bash block lines (continuations joined, comments dropped) and inline
  spans that run a command of ours."""
  found = []
  for lang, start, body in fenced_blocks(text):
    if lang not in ("bash", "sh", "shell"):
      continue
    pending, first = "", start
    for number, line in enumerate(body, start):
      if not pending:
        first = number
      code = strip_comment(line).rstrip()
      if code.endswith("\\"):
        pending += code[:-1] + " "
        continue
      whole = (pending + code).strip()
      pending = ""
      if whole:
        found.append(Command(first, whole))
  for number, span in inline_spans(text):
    if COMMAND_START.search(span):
      found.append(Command(number, span[COMMAND_START.search(span).start() :]))
  return found


def segments(command: str) -> list[list[str]]:
  """The simple commands of a line (split at &&, ||, ; and a spaced |), as tokens, with
  leading VAR=value assignments and the brackets around optional flags dropped."""
  result = []
  for part in re.split(r"&&|\|\||;| \| ", command):
    try:
      tokens = shlex.split(part)
    except ValueError:
      tokens = part.split()
    tokens = [t.strip("[]") for t in tokens]
    tokens = [t for t in tokens if t]
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):
      tokens.pop(0)
    if tokens:
      result.append(tokens)
  return result


def is_placeholder(value: str) -> bool:
  return not value or bool(PLACEHOLDER.search(value))


def flag_problems(args: list[str], flags: dict[str, Flag], what: str) -> list[str]:
  """Why args are not a valid argument list for a command defining `flags`."""
  problems = []
  config_flags = {n for n, f in flags.items() if f.kind == "config_file"}
  config_files = {n: flags[n].default for n in config_flags}
  for arg in args:  # the config files first: their overrides are checked against them
    name, _, value = arg[2:].partition("=")
    if arg.startswith("--") and name in config_flags and not is_placeholder(value):
      file = value.split(":", 1)[0]
      if not (ROOT / file).is_file():
        problems.append(f"{what}: --{name}={value}: no such config file")
      else:
        config_files[name] = file
  expect_value = False
  for arg in args:
    if expect_value:
      expect_value = False
      continue
    if arg == "..." or arg.startswith("..."):
      continue
    if not arg.startswith("-"):
      problems.append(f"{what}: positional argument {arg!r} (the commands take --flags only)")
      continue
    name, eq, value = arg.lstrip("-").partition("=")
    head, dot, key = name.partition(".")
    if dot:
      if head not in config_flags:
        problems.append(f"{what}: --{name}: {head!r} is not a config flag of this command")
      elif not key.isupper() and config_files.get(head):
        problem = config_key_problem(config_files[head], key)
        problems += [f"{what}: {problem}"] if problem else []
      continue
    flag = flags.get(name) or (flags.get(name[2:]) if name.startswith("no") and not eq else None)
    if flag is None and not {name, name.removeprefix("no")} & ABSL_FLAGS:
      problems.append(f"{what}: --{name} is not a flag of this command")
    elif flag is not None and name not in flags and flag.kind not in ("bool", "boolean"):
      problems.append(f"{what}: --{name}: --{name[2:]} is not a boolean flag")
    elif flag is not None and flag.choices and eq and not is_placeholder(value):
      if value not in flag.choices:
        problems.append(f"{what}: --{name}={value}: not one of {list(flag.choices)}")
    elif flag is not None and not eq and flag.kind not in ("bool", "boolean"):
      expect_value = True  # --flag VALUE
  return problems


def segment_problems(tokens: list[str], what: str) -> list[str]:
  """Why one simple command of the docs would not run as written."""
  program, rest = tokens[0], tokens[1:]
  if program == "srun" and rest:
    program, rest = rest[0], rest[1:]
  if program in ("python", "python3") and rest[:1] == ["-m"] and len(rest) > 1:
    module, args = rest[1], rest[2:]
    if module.startswith("alexnet_jax"):
      parts = module.split(".")
      if any(part.isupper() for part in parts):
        return []  # python -m alexnet_jax.NAME: a placeholder
      path = ROOT.joinpath(*parts).with_suffix(".py")
      if len(parts) != 2 or not path.is_file():
        exists = path.is_file() or ROOT.joinpath(*parts).is_dir()
        return [f"{what}: {module} is not a command" + ("" if exists else " (no such module)")]
      flags = defined_flags(path)
      if flags is None:
        return [f"{what}: {module} is not a command (no define_flags)"]
      return flag_problems(args, flags, f"{what} ({module})")
    if module == "pytest":
      return [
        f"{what}: pytest path {a} does not exist"
        for a in args
        if ("/" in a or a.endswith(".py")) and not (ROOT / a.split("::")[0]).exists()
      ]
    return []
  if program in ("python", "python3") and rest and rest[0].endswith(".py"):
    path = ROOT / rest[0]
    if not path.is_file():
      return [f"{what}: {rest[0]} does not exist"]
    flags = defined_flags(path)
    return [] if flags is None else flag_problems(rest[1:], flags, f"{what} ({rest[0]})")
  if program in ("./launch.sh", "launch.sh"):
    return flag_problems(rest, defined_flags(ROOT / "alexnet_jax" / "main.py"), f"{what} (main)")
  if "/" in program and not program.startswith(("/", "~", "$")):
    return [] if (ROOT / program).is_file() else [f"{what}: {program} does not exist"]
  if program == "bash" and rest and not rest[0].startswith("-"):
    return [] if (ROOT / rest[0]).is_file() else [f"{what}: {rest[0]} does not exist"]
  if program == "pip" and "-r" in rest:
    files = [rest[i + 1] for i, t in enumerate(rest[:-1]) if t == "-r"]
    return [f"{what}: {f} does not exist" for f in files if not (ROOT / f).is_file()]
  return []


# Links, paths and module names.


def slug(heading: str) -> str:
  """GitHub's anchor for a heading."""
  text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lstrip("#").strip())
  return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
  found, seen = set(), {}
  for line in prose(text).splitlines():
    if re.match(r"^#{1,6} ", line):
      base = slug(line)
      count = seen.get(base, 0)
      seen[base] = count + 1
      found.add(base if count == 0 else f"{base}-{count}")
  return found


def link_problems(doc: pathlib.Path, text: str) -> list[str]:
  problems = []
  body = prose(text)
  for m in LINK.finditer(body):
    target = m.group(1)
    if re.match(r"^[a-z]+:", target):
      continue  # http:, https:, mailto:
    file, _, anchor = target.partition("#")
    where = f"{doc.relative_to(ROOT)}:{line_of(body, m.start())}"
    path = (doc.parent / file).resolve() if file else doc
    if file and not path.exists():
      problems.append(f"{where}: link to {target}: {file} does not exist")
    elif anchor and path.suffix == ".md":
      if anchor not in anchors(text if path == doc else path.read_text()):
        problems.append(f"{where}: link to {target}: no heading #{anchor} in {path.name}")
  return problems


@functools.cache
def top_level_names(path: pathlib.Path) -> dict[str, set[str] | None]:
  """{name defined at the top of the module: the names its class defines, or None}."""
  names = {}
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.ClassDef):
      inner = set()
      for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
          inner.add(item.name)
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
          inner.add(item.target.id)
        elif isinstance(item, ast.Assign):
          inner.update(t.id for t in item.targets if isinstance(t, ast.Name))
      names[node.name] = inner
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      names[node.name] = None
    elif isinstance(node, ast.Assign):
      for target in node.targets:
        for t in ast.walk(target):
          if isinstance(t, ast.Name):
            names[t.id] = None
    elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
      names[node.target.id] = None
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      names.update({(a.asname or a.name).split(".")[0]: None for a in node.names})
  return names


def dotted_problem(name: str) -> str | None:
  """Why alexnet_jax.a.b.c names no module, or no name its module defines; None if it does."""
  parts = name.split(".")
  for i in range(len(parts), 0, -1):
    base = ROOT.joinpath(*parts[:i])
    module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else None
    if module is None and (base / "__init__.py").is_file():
      module = base / "__init__.py"
    if module is not None:
      break
  else:
    return f"{name}: no such module"
  rest = parts[i:]
  if not rest:
    return None
  names = top_level_names(module)
  if rest[0] not in names:
    if module.name == "__init__.py" and not ROOT.joinpath(*parts[: i + 1]).exists():
      return f"{name}: no module {'.'.join(parts[: i + 1])}"
    if module.name != "__init__.py":
      return f"{name}: {'.'.join(parts[:i])} defines no {rest[0]!r}"
    return None
  inner = names[rest[0]]
  if len(rest) > 1 and inner is not None and rest[1] not in inner:
    return f"{name}: {rest[0]} has no {rest[1]!r}"
  return None


def python_import_problems(code: str, where: str) -> list[str]:
  try:
    tree = ast.parse(code)
  except SyntaxError as e:
    return [f"{where}: the python block does not parse: {e}"]
  problems = []
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("alexnet_jax"):
      names = [f"{node.module}.{a.name}" for a in node.names]
    elif isinstance(node, ast.Import):
      names = [a.name for a in node.names if a.name.startswith("alexnet_jax")]
    problems += [f"{where}: import {p}" for n in names if (p := dotted_problem(n))]
  return problems


def doc_problems(doc: pathlib.Path, text: str) -> list[str]:
  """Everything in one document that would not run or does not exist."""
  name = str(doc.relative_to(ROOT))
  problems = []
  for command in commands(text):
    for tokens in segments(command.text):
      problems += segment_problems(tokens, f"{name}:{command.line}")
  for number, span in inline_spans(text):
    where = f"{name}:{number}"
    if PATH_SPAN.match(span) and "<" not in span:
      exists = list(ROOT.glob(span)) if "*" in span else (ROOT / span).exists()
      problems += [] if exists else [f"{where}: {span} does not exist"]
    for m in DOTTED.finditer(span):
      if not any(part.isupper() for part in m.group().split(".")):  # alexnet_jax.NAME
        problems += [f"{where}: {p}"] if (p := dotted_problem(m.group())) else []
    m = re.match(r"^--config\.([\w.]+)(=\S*)?$", span)
    if m and not m.group(1).isupper():
      problem = config_key_problem("configs/default.py", m.group(1))
      problems += [f"{where}: {problem}"] if problem else []
  for lang, start, body in fenced_blocks(text):
    if lang == "python":
      problems += python_import_problems("\n".join(body), f"{name}:{start}")
  return problems + link_problems(doc, text)


# The tests.


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_flag_link_and_name_in_the_docs_exists(doc):
  assert doc_problems(doc, doc.read_text()) == []


def test_the_readme_starts_with_the_two_commands_and_they_check_out():
  """The README's first block: install and train on the embedded data, install and test."""
  text = (ROOT / "README.md").read_text()
  lang, start, body = fenced_blocks(text)[0]
  lines = [line for line in body if not line.startswith("#")]
  assert lang == "bash" and len(lines) == 2
  train, test = (segments(line) for line in lines)
  assert train[-1][:3] == ["python", "-m", "alexnet_jax.main"]
  assert "--config=configs/quickstart.py" in train[-1]
  assert test[-1][:3] == ["python", "-m", "pytest"]
  for tokens in train + test:
    assert segment_problems(tokens, "README.md") == []


def test_the_checker_reads_every_command_of_the_docs():
  """It cannot pass by reading nothing: every command of ours appears in the docs it checks."""
  seen = set()
  for doc in DOCS:
    for command in commands(doc.read_text()):
      for tokens in segments(command.text):
        seen.update(
          t for t in tokens if t.startswith("alexnet_jax.") or t.startswith("benchmarks/")
        )
  mains = {
    f"alexnet_jax.{p.stem}"
    for p in (ROOT / "alexnet_jax").glob("*.py")
    if defined_flags(p) is not None
  }
  assert mains and mains <= seen


def test_the_readme_is_the_front_door():
  """Short, and linking every docs page."""
  text = (ROOT / "README.md").read_text()
  assert len(text.splitlines()) <= README_MAX_LINES, "the reference belongs in docs/"
  linked = {m.group(1).partition("#")[0] for m in LINK.finditer(text)}
  pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
  assert pages and pages <= linked


FAKE = """# Fake

```bash
python -m alexnet_jax.main --config=configs/quickstart.py --workdir=DIR --wrokdir=DIR \\
    --config.num_train_stepz=4 --config.model.towerz=1 --mode=evaluate
python -m alexnet_jax.nosuch --x=1
python -m alexnet_jax.training.train --config=x
python -m alexnet_jax.extract --workdir DIR --output=F.npz stray
python benchmarks/nope.py --rounds=1
python benchmarks/retrieval.py --rounds=1
python -m alexnet_jax.experiments --config=configs/nope.py --report_only --noseeds --nohelp_me
python -m alexnet_jax.bench --nologtostderr --helpfull
```

Inline: `python -m alexnet_jax.prepare --manual_dir=A --data_dir=B --formt=raw`, and
`--config.learning_rat=0.1`. Old paths: `alexnet_jax/train.py`, `alexnet_jax.models.AlexNet`,
`alexnet_jax.training.restore.restor`. [a page](nope.md), [a heading](#nowhere), [ok](#fake).

```python
from alexnet_jax.models import AlexNet
```

## Moved

| old | new |
|---|---|
| `alexnet_jax.train` | `alexnet_jax.training.train` |
| `alexnet_jax.restore` | `alexnet_jax.training.nowhere` |
"""


def test_the_checker_sees_wrong_flags_keys_modules_links_and_names():
  problems = "\n".join(doc_problems(ROOT / "docs" / "fake.md", FAKE))
  for expected in (
    "--wrokdir is not a flag",
    "has no key 'num_train_stepz'",
    "has no key 'model.towerz'",
    "--mode=evaluate: not one of ['train', 'eval']",
    "alexnet_jax.nosuch is not a command (no such module)",
    "alexnet_jax.training.train is not a command",
    "positional argument 'stray'",
    "benchmarks/nope.py does not exist",
    "(benchmarks/retrieval.py): --rounds is not a flag",
    "--config=configs/nope.py: no such config file",
    "--noseeds: --seeds is not a boolean flag",
    "--nohelp_me is not a flag",
    "--formt is not a flag",
    "has no key 'learning_rat'",
    "alexnet_jax/train.py does not exist",
    "alexnet_jax.models.AlexNet: no module alexnet_jax.models",
    "restore defines no 'restor'",
    "import alexnet_jax.models.AlexNet",
    "link to nope.md",
    "no heading #nowhere",
    "alexnet_jax.training.nowhere: no module alexnet_jax.training.nowhere",
  ):
    assert expected in problems, expected
  for fine in (
    "--workdir DIR",
    "#fake",
    "alexnet_jax.train:",
    "alexnet_jax.restore:",
    "alexnet_jax.bench",
  ):
    assert fine not in problems, fine
