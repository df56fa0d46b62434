"""The package's shape: imports flow one way, train.py is the top, private names stay home."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "alexnet_jax"
MODULES = {p.stem for p in PACKAGE.glob("*.py")}


def imports_of(path: pathlib.Path) -> dict[str, set[str]]:
  """{package module imported (anywhere in the file, functions included): names taken from it}."""
  found: dict[str, set[str]] = {}
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module == "alexnet_jax":
      for alias in node.names:
        found.setdefault(alias.name, set())
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("alexnet_jax."):
      found.setdefault(node.module.split(".")[1], set()).update(a.name for a in node.names)
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("alexnet_jax."):
          found.setdefault(alias.name.split(".")[1], set())
  return {m: names for m, names in found.items() if m in MODULES}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  found, done = [], set()

  def visit(node, stack):
    for nxt in sorted(edges.get(node, ())):
      if nxt in stack:
        found.append(stack[stack.index(nxt) :] + [nxt])
      elif nxt not in done:
        visit(nxt, stack + [nxt])
    done.add(node)

  for node in sorted(edges):
    visit(node, [node])
  return found


def test_cycle_finder_sees_a_cycle():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
  edges = {m: set(imports_of(PACKAGE / f"{m}.py")) - {m} for m in MODULES}
  assert cycles(edges) == []


def test_only_the_commands_that_train_import_train():
  """The train loop is the end of the one-way flow: only the training command and the
  experiments runner (suites of training runs) import it."""
  importers = sorted(m for m in MODULES if "train" in imports_of(PACKAGE / f"{m}.py"))
  assert importers == ["experiments", "main"]


def private_uses(path: pathlib.Path) -> list[str]:
  """`from alexnet_jax.m import _x` and `m._x` where m is a package module bound by an import."""
  tree = ast.parse(path.read_text())
  bound = {}  # local name -> package module
  uses = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module == "alexnet_jax":
      bound.update({a.asname or a.name: a.name for a in node.names})
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("alexnet_jax."):
      uses += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    elif isinstance(node, ast.Import):
      bound.update(
        {a.asname: a.name.split(".")[1] for a in node.names if a.asname and "." in a.name}
      )
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.Attribute)
      and node.attr.startswith("_")
      and not node.attr.startswith("__")
      and isinstance(node.value, ast.Name)
      and bound.get(node.value.id) in MODULES
    ):
      uses.append(f"{node.value.id}.{node.attr}")
  return uses


def test_private_finder_sees_private_uses(tmp_path):
  path = tmp_path / "x.py"
  path.write_text(
    "from alexnet_jax import train as t\nfrom alexnet_jax.ops import _DIMS\nt._setup()\n"
  )
  assert sorted(private_uses(path)) == ["alexnet_jax.ops._DIMS", "t._setup"]


@pytest.mark.parametrize(
  "folder", ["alexnet_jax", "tests", "benchmarks"], ids=lambda folder: folder
)
def test_no_private_name_is_used_outside_its_module(folder):
  uses = {str(p.relative_to(ROOT)): private_uses(p) for p in sorted((ROOT / folder).glob("*.py"))}
  assert {path: u for path, u in uses.items() if u} == {}


def test_tests_share_through_conftest_not_each_other():
  """A test module imports no other test module: what they share is in conftest.py."""
  imported = {
    p.name: [
      node.module
      for node in ast.walk(ast.parse(p.read_text()))
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("test_")
    ]
    for p in sorted((ROOT / "tests").glob("test_*.py"))
  }
  assert {name: mods for name, mods in imported.items() if mods} == {}
