"""The package's shape: parts that import one way, commands on top that nothing imports, no
module too long to read, private names kept home, tests laid out like the package.

The part table (docs/layout.md explains it):

  core      errors, atomic files, the commands' shared CLI    imports nothing of ours
  model     the net, its ops, sharding, backend options       core
  data      sources, shards, statistics, batches, TFDS        core
  weights   published layouts, safe readers, torch nets       core, model
  training  loop, steps, optimizer, checkpoints, restore      core, model, data, weights
  analysis  features, feature files, retrieval, figures       core, model, data, weights, training
  studies   experiments suites, benchmark timing              every part
  commands  alexnet_jax/*.py, what users type                 anything; nothing imports them
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "alexnet_jax"

ALLOWED = {
  "core": set(),
  "model": {"core"},
  "data": {"core"},
  "weights": {"core", "model"},
  "training": {"core", "model", "data", "weights"},
  "analysis": {"core", "model", "data", "weights", "training"},
  "studies": {"core", "model", "data", "weights", "training", "analysis"},
}
MAX_LINES = 450


@dataclasses.dataclass(frozen=True)
class Module:
  """One module of the package: `part` is its subpackage, or "commands" at the top."""

  name: str  # dotted, without the package: "training.train", "main"
  part: str
  path: pathlib.Path


def modules(package: pathlib.Path) -> dict[str, Module]:
  found = {}
  for path in sorted(package.rglob("*.py")):
    parts = path.relative_to(package).with_suffix("").parts
    if parts[-1] == "__init__":
      continue
    name = ".".join(parts)
    found[name] = Module(name, parts[0] if len(parts) > 1 else "commands", path)
  return found


def imports_of(path: pathlib.Path, package: str = "alexnet_jax") -> set[str]:
  """The modules of ours a file may import, anywhere in it (functions too), without the package
  prefix: `from alexnet_jax.training import train` gives training and training.train; the
  caller keeps those that are modules."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      if node.module == package or node.module.startswith(package + "."):
        base = node.module[len(package) + 1 :]
        found |= {f"{base}.{alias.name}".lstrip(".") for alias in node.names} | {base}
    elif isinstance(node, ast.Import):
      found |= {a.name[len(package) + 1 :] for a in node.names if a.name.startswith(package + ".")}
  return found


def edges(package: pathlib.Path) -> dict[str, set[str]]:
  """{module: the modules of ours it imports}."""
  mods = modules(package)
  return {
    name: {m for m in imports_of(mod.path, package.name) if m in mods and m != name}
    for name, mod in mods.items()
  }


def violations(package: pathlib.Path) -> list[str]:
  """Every import that breaks the part table: a part reaching a part not below it, or anything
  importing a command."""
  mods = modules(package)
  found = []
  for name, targets in edges(package).items():
    part = mods[name].part
    for target in sorted(targets):
      to = mods[target].part
      if to == "commands":
        found.append(f"{name} imports the command {target}")
      elif part != "commands" and to != part and to not in ALLOWED[part]:
        found.append(f"{name} ({part}) imports {target} ({to})")
  return found


def write_package(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
  package = root / "alexnet_jax"
  for rel, text in files.items():
    path = package / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return package


def test_the_part_checker_sees_violations(tmp_path):
  package = write_package(
    tmp_path,
    {
      "main.py": "from alexnet_jax.training import train\n",
      "extract.py": "",
      "data/datasets.py": "def f():\n  from alexnet_jax.training import config_check\n",
      "model/alexnet.py": "import alexnet_jax.extract\nfrom alexnet_jax.core import errors\n",
      "training/train.py": "from alexnet_jax.data import datasets\n",
      "training/config_check.py": "",
      "core/errors.py": "",
    },
  )
  assert violations(package) == [
    "data.datasets (data) imports training.config_check (training)",
    "model.alexnet imports the command extract",
  ]


def test_every_module_keeps_to_the_part_table():
  assert violations(PACKAGE) == []


def test_the_parts_are_the_table_and_their_inits_are_empty():
  """Empty `__init__.py`s: importing a part pulls nothing in (no TensorFlow on the model path)."""
  parts = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
  assert parts == sorted(ALLOWED)
  assert {p: (PACKAGE / p / "__init__.py").read_text() for p in parts} == {p: "" for p in parts}


def test_commands_are_thin():
  """A command parses flags and calls into the parts: its own code is its flags and main."""
  long = {
    m.name: n
    for m in modules(PACKAGE).values()
    if m.part == "commands" and (n := len(m.path.read_text().splitlines())) > 120
  }
  assert long == {}


def test_no_module_is_too_long_to_read():
  long = {
    m.name: n
    for m in modules(PACKAGE).values()
    if (n := len(m.path.read_text().splitlines())) > MAX_LINES
  }
  assert long == {}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  found, done = [], set()

  def visit(node, stack):
    for nxt in sorted(graph.get(node, ())):
      if nxt in stack:
        found.append(stack[stack.index(nxt) :] + [nxt])
      elif nxt not in done:
        visit(nxt, stack + [nxt])
    done.add(node)

  for node in sorted(graph):
    visit(node, [node])
  return found


def test_cycle_finder_sees_a_cycle():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules():
  assert cycles(edges(PACKAGE)) == []


def test_only_the_commands_that_train_import_the_loop():
  """The train loop is the end of the one-way flow: only the training command and the
  experiments runner (suites of training runs) import it."""
  importers = sorted(m for m, targets in edges(PACKAGE).items() if "training.train" in targets)
  assert importers == ["main", "studies.suites"]


def private_uses(path: pathlib.Path) -> list[str]:
  """`from alexnet_jax.x import _y` and `m._y` where m is a module of ours bound by an import."""
  tree = ast.parse(path.read_text())
  bound = set()  # local names of our modules
  uses = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("alexnet_jax"):
      uses += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
      bound.update(a.asname or a.name for a in node.names)
    elif isinstance(node, ast.Import):
      bound.update(a.asname for a in node.names if a.asname and a.name.startswith("alexnet_jax."))
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.Attribute)
      and node.attr.startswith("_")
      and not node.attr.startswith("__")
      and isinstance(node.value, ast.Name)
      and node.value.id in bound
    ):
      uses.append(f"{node.value.id}.{node.attr}")
  return uses


def test_private_finder_sees_private_uses(tmp_path):
  path = tmp_path / "x.py"
  path.write_text(
    "from alexnet_jax.training import train as t\nfrom alexnet_jax.model.ops import _DIMS\n"
    "t._setup()\n"
  )
  assert sorted(private_uses(path)) == ["alexnet_jax.model.ops._DIMS", "t._setup"]


@pytest.mark.parametrize("folder", ["alexnet_jax", "tests", "benchmarks"])
def test_no_private_name_is_used_outside_its_module(folder):
  uses = {str(p.relative_to(ROOT)): private_uses(p) for p in sorted((ROOT / folder).rglob("*.py"))}
  assert {path: u for path, u in uses.items() if u} == {}


def test_tests_are_laid_out_like_the_package():
  """tests/<part>/test_*.py for the parts, tests/system/ for whole processes; no other folder,
  and no test file at the top but the package-wide ones."""
  folders = sorted(p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and p.name[0] != "_")
  assert set(folders) - {"__pycache__"} == set(ALLOWED) | {"system"}
  assert sorted(p.name for p in (ROOT / "tests").glob("test_*.py")) == [
    "test_docs.py",
    "test_parts.py",
  ]


def test_tests_share_through_conftest_not_each_other():
  """A test module imports no other test module: what they share is in conftest.py."""
  imported = {
    str(p.relative_to(ROOT)): [
      node.module
      for node in ast.walk(ast.parse(p.read_text()))
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("test_")
    ]
    for p in sorted((ROOT / "tests").rglob("test_*.py"))
  }
  assert {name: mods for name, mods in imported.items() if mods} == {}
