"""The package's import layers (the docstring of steindiff/__init__.py): no module imports one of a higher
layer, and the import graph has no cycle, counting imports inside functions too (read from the source with ast)."""

import ast
from pathlib import Path

import steindiff

ROOT = Path(steindiff.__file__).resolve().parent

#: The layers of the package docstring, lowest first (a package stands for all its modules).
LAYERS = (
    ("steindiff._version", "steindiff._forward_ad", "steindiff.io", "steindiff.device", "steindiff.plotting",
     "steindiff.noise", "steindiff.fingerprint"),
    ("steindiff.schedules", "steindiff.solvers", "steindiff.data", "steindiff.metrics", "steindiff.distances"),
    ("steindiff.models",),
    ("steindiff.stabilizers",),
    ("steindiff.plan", "steindiff.sampling"),
    ("steindiff.generate", "steindiff.guards", "steindiff.trajectory", "steindiff.gradient_fit",
     "steindiff.fit_estimate", "steindiff.peers", "steindiff.diagnostics"),
    ("steindiff.calibration", "steindiff.distributed", "steindiff.train"),
    ("steindiff.api", "steindiff.bench", "steindiff.integrations"),
    ("steindiff.cli", "steindiff.__main__"),
    ("steindiff",),
)


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The steindiff modules ``name`` imports anywhere in its source (``from a import b`` names the
    submodule ``a.b`` when there is one)."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            out |= {f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names}
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def layer(module: str) -> int:
    """The index in LAYERS of the longest prefix of ``module`` listed there."""
    best = None
    for i, names in enumerate(LAYERS):
        for n in names:
            prefix = n != "steindiff" and module.startswith(n + ".")  # the package itself: only by its name
            if (module == n or prefix) and (best is None or len(n) > len(best[1])):
                best = (i, n)
    assert best is not None, f"{module} is in no layer of LAYERS"
    return best[0]


def test_every_module_has_a_layer():
    for m in MODULES:
        layer(m)


def test_no_import_runs_up():
    bad = []
    for m, targets in GRAPH.items():
        for t in targets:
            # importing a.b.c runs the package a.b first: its layer counts too
            # (the package steindiff itself runs first for every module: only an import by its name counts)
            for dep in {t} | {t.rsplit(".", k)[0] for k in range(1, t.count("."))}:
                if dep in MODULES and not m.startswith(dep + ".") and layer(dep) > layer(m):
                    bad.append(f"{m} (layer {layer(m)}) imports {dep} (layer {layer(dep)})")
    assert not bad, "\n".join(sorted(set(bad)))


def test_no_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(GRAPH[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
