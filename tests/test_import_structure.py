"""No import circles among npdiff's modules.

Every import statement counts, also one inside a function: a lazy import hides a circle from Python at
import time, not from a reader, who still has to know both files to understand either. The finder below
reads the source with `ast` (it imports nothing), draws an edge from a module to every npdiff module it
imports, and lists the strongly connected components with more than one module (Tarjan's algorithm).
"""

import ast
from pathlib import Path

import npdiff

PACKAGE_ROOT = Path(npdiff.__file__).parent



def module_files(root):
    """{dotted module name: file} for every .py file under the package folder `root`."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _owning_module(name, modules):
    """"npdiff.kernels.conv.output_size" -> "npdiff.kernels.conv": the longest prefix that is a module."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imported_names(tree, module, is_package):
    """Every module name an import statement in `tree` names (at any depth), relative ones resolved."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[:len(parts) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                yield f"{base}.{alias.name}"  # "from pkg import sub" names pkg.sub; else resolves to pkg


def import_graph(root):
    """{module: set of the package's modules it imports}."""
    modules = module_files(root)
    package = root.name
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for imported in _imported_names(tree, name, path.name == "__init__.py"):
            if imported.split(".")[0] != package:
                continue
            target = _owning_module(imported, modules)
            if target and target != name:
                graph[name].add(target)
    return graph


def circles(graph):
    """The strongly connected components of more than one module, each sorted, in sorted order."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_no_import_circles_in_npdiff():
    found = circles(import_graph(PACKAGE_ROOT))
    assert found == [], "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def _nested_imports(tree):
    """The import statements inside a function or class body of `tree` (each once)."""
    scopes = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    found = {}
    for scope in ast.walk(tree):
        if isinstance(scope, scopes):
            for node in ast.walk(scope):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    found[id(node)] = node
    return list(found.values())


def _names_the_package(node, package):
    if isinstance(node, ast.ImportFrom):
        return bool(node.level) or (node.module or "").split(".")[0] == package
    return any(alias.name.split(".")[0] == package for alias in node.names)


def lazy_imports_without_a_reason(root):
    """[(module, line)] of the imports of the package's own modules made inside a function or class
    without a comment on that line or the line above saying why they are not at the top."""
    found = []
    for name, path in module_files(root).items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in _nested_imports(ast.parse("\n".join(lines), filename=str(path))):
            if not _names_the_package(node, root.name):
                continue
            here = lines[node.lineno - 1]
            above = lines[node.lineno - 2] if node.lineno > 1 else ""
            if "#" not in here and not above.strip().startswith("#"):
                found.append((name, node.lineno))
    return sorted(found)


def test_lazy_imports_of_npdiff_modules_say_why():
    """A function-local import hides what a module depends on; it stays only where it avoids a heavy or
    optional import at import time (or must wait, as NumPy in startup.py), and a comment says so."""
    found = lazy_imports_without_a_reason(PACKAGE_ROOT)
    assert found == [], "function-local imports without a reason: " + ", ".join(f"{m}:{n}" for m, n in found)


def test_the_finder_sees_lazy_and_relative_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from pkg.b import g\n    return g\n")  # lazy
    (package / "b.py").write_text("from .sub import c\n\ndef g():\n    return c\n")  # relative
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "c.py").write_text("import pkg.a\n")
    (package / "d.py").write_text("import pkg.a\n")  # imports into the circle, not part of it
    graph = import_graph(package)
    assert graph["pkg.b"] == {"pkg.sub.c"} and graph["pkg.d"] == {"pkg.a"}
    assert circles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    assert lazy_imports_without_a_reason(package) == [("pkg.a", 2)]
    (package / "a.py").write_text("def f():\n    return 1\n")
    assert circles(import_graph(package)) == []
    (package / "e.py").write_text("def f():\n    # cupy only when asked for\n    from pkg import b\n")
    assert lazy_imports_without_a_reason(package) == []
