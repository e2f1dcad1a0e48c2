"""The package's structure: modules import in one direction only, and the oracle imports
nothing of the kernels' side."""

import ast
from pathlib import Path

import vaekern

PACKAGE = Path(vaekern.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the vaekern modules it imports, anywhere in its body (deferred imports too)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # "from vaekern._ops import x": x is a submodule, or a name in the package.
                subs = [f"{node.module}.{alias.name}" for alias in node.names]
                targets = subs if all(s in modules for s in subs) else subs + [node.module]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        edges[name] = found
    return edges


def test_no_import_cycles():
    edges = _imports()
    # A package imports its own submodules when it is initialised; only a submodule that
    # imports back into a module that imports it (directly or not) closes a cycle.
    state = {}

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(edges[module]):
            if module.startswith(dep + "."):  # a submodule reading its own package
                continue
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_reference_imports_nothing_of_vaekern():
    assert _imports()["vaekern.reference"] == set()


def test_kernels_do_not_import_the_api():
    """The op layer, the Triton kernels and the registry sit below the public API."""
    edges = _imports()
    api = {"vaekern", "vaekern.functional", "vaekern.nn", "vaekern.reference"}
    for module, deps in edges.items():
        if module.startswith(("vaekern._ops", "vaekern._triton", "vaekern._extension", "vaekern.backends")):
            assert not deps & api, f"{module} imports {deps & api}"
