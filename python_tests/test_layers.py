"""The package's imports follow its layers and have no cycle.

Layers, bottom to top: the op (ops/, modules.py, _extension.py, kernels/, _io.py and the
package root, which re-exports the op API) -> config -> data -> models -> train -> cli and
bench. A module may import its own layer or a lower one, never a higher one; above the op
layer nobody imports names from the package root (it loads the kernels: import the op
from autoft_fast.ops / autoft_fast.modules). Every import counts, also one inside a function.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = "autoft_fast"

# Module-name prefix -> layer (the longest matching prefix wins).
LAYERS = {
    PKG: 0, f"{PKG}.ops": 0, f"{PKG}.modules": 0,
    f"{PKG}.kernels": 0, f"{PKG}._io": 0,
    f"{PKG}.config": 1,
    f"{PKG}.data": 2,
    f"{PKG}.models": 3, f"{PKG}.dropin": 3,
    f"{PKG}.train": 4,
    f"{PKG}.cli": 5, f"{PKG}.bench": 5, f"{PKG}.__main__": 5,
}
LAYER_NAMES = ["op", "config", "data", "models", "train", "cli"]


@functools.lru_cache(maxsize=None)
def package_modules() -> dict[str, Path]:
    """{dotted module name: file} for every .py of the package (kernels/ ships as
    autoft_fast.kernels)."""
    out = {}
    for base, prefix in ((ROOT / PKG, PKG), (ROOT / "kernels", f"{PKG}.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def layer_of(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def bound_names(package: str) -> set[str]:
    """Names the package's __init__ binds at its top level (what `from package import x`
    takes from it rather than from a submodule)."""
    mods = package_modules()
    path = mods.get(package)
    if path is None or path.name != "__init__.py":
        return set()
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, names taken from the package root) for every import in
    the file, relative ones resolved, function-level ones included."""
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == PKG or a.name.startswith(PKG + "."):
                    found.append((a.name, node.lineno, a.name == PKG))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not (base == PKG or base.startswith(PKG + ".")):
                continue
            if base in known and package_modules()[base].name != "__init__.py":
                found.append((base, node.lineno, False))  # names from a plain module
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in known:
                    found.append((sub, node.lineno, False))
                elif a.name in bound_names(base):
                    found.append((base, node.lineno, base == PKG))
                # else: a compiled submodule such as _C, outside the Python layers
    return [(m, line, root) for m, line, root in found if m in known]


@pytest.fixture(scope="module")
def graph():
    mods = package_modules()
    known = set(mods)
    return mods, {m: imports_of(m, p, known) for m, p in mods.items()}


def test_the_walk_sees_the_whole_package(graph):
    mods, edges = graph
    for expected in (f"{PKG}.config.schema", f"{PKG}.models.transfer", f"{PKG}.train.runner",
                     f"{PKG}.cli", f"{PKG}.kernels", f"{PKG}.ops.functional"):
        assert expected in mods
    # function-level and relative imports are resolved too
    assert any(m == f"{PKG}.ops._extension" for m, _, _ in edges[f"{PKG}.ops.registry"])
    assert any(m == f"{PKG}.train.runner" for m, _, _ in edges[f"{PKG}.cli"])


def test_no_import_goes_up_a_layer(graph):
    mods, edges = graph
    bad = []
    for m, deps in edges.items():
        for dep, line, from_root in deps:
            if layer_of(dep) > layer_of(m):
                bad.append(f"{mods[m].relative_to(ROOT)}:{line} ({LAYER_NAMES[layer_of(m)]}) "
                           f"imports {dep} ({LAYER_NAMES[layer_of(dep)]})")
            if from_root and 0 < layer_of(m) < 5:
                bad.append(f"{mods[m].relative_to(ROOT)}:{line} imports from the package root; "
                           "import from autoft_fast.ops or autoft_fast.modules")
    assert not bad, "\n".join(bad)


def test_no_import_cycle(graph):
    _, edges = graph
    adj = {m: sorted({d for d, _, _ in deps if d != m}) for m, deps in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in adj[m]:
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(adj):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    # The same rules on a made-up pair of modules: they must fail there.
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from autoft_fast.train import runner\n")
    b.write_text("from . import a\n")
    known = {f"{PKG}.config.a", f"{PKG}.config.b", f"{PKG}.train.runner"}
    ea = imports_of(f"{PKG}.config.a", a, known)
    assert ea == [(f"{PKG}.train.runner", 2, False)]
    assert layer_of(ea[0][0]) > layer_of(f"{PKG}.config.a")
    assert imports_of(f"{PKG}.config.b", b, known) == [(f"{PKG}.config.a", 1, False)]
