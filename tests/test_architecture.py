"""The package's floors: imports point one way, and only compat touches torch internals."""

import ast
import pathlib

import implicit_layers

ROOT = pathlib.Path(implicit_layers.__file__).parent
# floor of each top-level part of the package: a module may import from its own floor or lower
FLOORS = {"errors": 0, "stats": 0, "compat": 0, "checks": 0, "_version": 0, "testing": 0,
          "linalg": 1, "solvers": 2, "core": 3, "layers": 4, "functional": 5, "__init__": 6}


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("implicit_layers"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("implicit_layers")}
    return names


def _modules():
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.parts[-1] == "__init__" else rel.parts
        yield ".".join(parts), path


def test_imports_point_down_the_floors():
    upward = []
    for module, path in _modules():
        mine = FLOORS[_part(module)]
        for target in _imports(path):
            if target == "implicit_layers" and _part(module) != "__init__":
                upward.append((module, target))
            elif target != "implicit_layers" and FLOORS[_part(target)] > mine:
                upward.append((module, target))
    assert not upward, f"imports that run up the floors: {upward}"


def test_only_compat_uses_private_torch_internals():
    markers = ("torch._C", "_functorch", "forward_ad._current_level", "._parameters[")
    users = [module for module, path in _modules() if module != "implicit_layers.compat"
             and any(m in line for line in path.read_text().splitlines()
                     if not line.strip().startswith(("#", ">>>", "<"))
                     for m in markers)]
    assert not users, f"private torch internals outside compat: {users}"


def test_at_most_three_autograd_functions():
    functions = [f"{module}.{node.name}" for module, path in _modules()
                 for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.ClassDef)
                 and any(ast.unparse(b).endswith(("autograd.Function", "Function")) for b in node.bases)]
    assert len(functions) <= 3, functions
    assert "implicit_layers.core.implicit.ImplicitFunction" in functions


def test_no_import_cycles():
    """Between modules, lazy (function-level) imports included; a package's ``__init__``
    re-exporting its own modules is not a cycle (importing a module runs its package's
    ``__init__`` first anyway)."""
    graph = {module: {t for t in _imports(path) if t != module} for module, path in _modules()}
    graph = {m: {t for t in ts if t in graph and not m.startswith(t + ".")} for m, ts in graph.items()}
    seen, stack, cycles = {}, [], []

    def visit(node):
        seen[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, ()):
            if seen.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in seen:
                visit(nxt)
        stack.pop()
        seen[node] = "done"

    for node in graph:
        if node not in seen:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_library_tests_do_not_import_the_experiments():
    """Tests of the library (everything but tests/experiments) run without the experiments."""
    tests = pathlib.Path(__file__).parent

    def imports_experiments(path: pathlib.Path) -> bool:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if any(n == "experiments" or n.startswith("experiments.") for n in names):
                return True
        return False

    library_tests = [p for p in tests.rglob("*.py") if "experiments" not in p.relative_to(tests).parts]
    assert len(library_tests) > 20
    assert [str(p.relative_to(tests)) for p in library_tests if imports_experiments(p)] == []
