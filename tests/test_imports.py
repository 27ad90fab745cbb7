"""The package's import graph, read from the source: no cycle (function-local imports count),
and the leaves stay leaves: `kvjax/config.py` and `kvjax/layers/` import only downward."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kvjax"


def module_name(path: Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def resolve(name: str) -> str:
  """The module an import names: `kvjax.a.b` is module b if it exists, else a name in kvjax.a."""
  while name not in MODULES:
    name = name.rpartition(".")[0]
  return name


def ancestors(name: str) -> list[str]:
  parts = name.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


def _runs(tree: ast.AST):
  """The file's nodes, but for `if TYPE_CHECKING:` blocks (imports for type checkers only)."""
  for node in ast.iter_child_nodes(tree):
    if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
      continue
    yield node
    yield from _runs(node)


def imports(name: str) -> set[str]:
  """Every kvjax module whose code runs when `name` imports what it names (anywhere in the file,
  function bodies included): the module, and the package `__init__`s above it that `name` is not
  already inside."""
  tree = ast.parse(MODULES[name].read_text())
  named = set()
  for node in _runs(tree):
    if isinstance(node, ast.Import):
      named |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      named |= {f"{node.module}.{a.name}" for a in node.names}
  out = set()
  for target in (resolve(n) for n in named if n.split(".")[0] == "kvjax"):
    out |= {target, *ancestors(target)}
  return out - {name, *ancestors(name)}


GRAPH = {name: imports(name) for name in MODULES}


def reachable(name: str) -> set[str]:
  seen, todo = set(), [name]
  while todo:
    for nxt in GRAPH[todo.pop()] - seen:
      seen.add(nxt)
      todo.append(nxt)
  return seen


def test_the_import_graph_has_no_cycle():
  cycles = sorted(name for name in GRAPH if name in reachable(name))
  assert not cycles, f"modules on an import cycle: {cycles}"


def test_config_imports_only_the_errors():
  assert reachable("kvjax.config") == {"kvjax.errors"}
  assert reachable("kvjax.errors") == set()


def test_layers_import_only_downward():
  """The layers know no method and no cache kind: they reach only config, errors, the method
  spec (a leaf) and each other."""
  allowed = {"kvjax.config", "kvjax.errors", "kvjax.method", "kvjax.layers"}
  for name in MODULES:
    if name.startswith("kvjax.layers"):
      outside = {m for m in reachable(name)
                 if m not in allowed and not m.startswith("kvjax.layers.")}
      assert not outside, f"{name} reaches {sorted(outside)}"


def test_the_dense_cache_and_the_kernel_references_are_leaves():
  """The dense layout imports no other cache kind (only how entries are stored)."""
  assert not {m for m in reachable("kvjax.cache.dense") if m != "kvjax.cache.storage"
              and (m.startswith("kvjax.cache.") or m.startswith("kvjax.decode"))}
  for ref in ("shared_kv_decode_ref", "block_sparse_decode_ref"):
    assert "kvjax.layers.dot_product" in GRAPH[f"kvjax.pallas_kernels.{ref}"]
    assert "kvjax.layers.attention" not in reachable(f"kvjax.pallas_kernels.{ref}")
