"""The layers of headrace, kept by a test: no import from a lower layer to a higher one.

Lowest first (ARCHITECTURE.md section 2). A module may import its own layer and the layers
below; type-only imports (``if TYPE_CHECKING:``) count too, because they are dependencies of
the design just the same. The test reads the source with ``ast``; nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: (layer, module prefixes), lowest first
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("operators: what a job is", ("headrace.operators",)),
    # the runtime package's __init__ holds only its docstring
    ("runtime package", ("headrace.runtime",)),
    (
        "settings and logs",
        (
            "headrace.runtime.config",
            "headrace.runtime.logs",
            "headrace.runtime.faults",
            "headrace.runtime.gctuning",
        ),
    ),
    ("state", ("headrace.runtime.state",)),
    ("kafka", ("headrace.runtime.kafka",)),
    ("checkpoint", ("headrace.runtime.checkpoint",)),
    ("task", ("headrace.runtime.task",)),
    ("host", ("headrace.runtime.host",)),
    (
        "operations",
        (
            "headrace.runtime.view",
            "headrace.runtime.metrics",
            "headrace.runtime.status",
            "headrace.runtime.inspect",
        ),
    ),
    (
        "drivers",
        (
            "headrace.runtime.stage_runner",
            "headrace.runtime.worker",
            "headrace.runtime.testing",
            "headrace.runtime.memory_kafka",
            "headrace.runtime.integrations",
        ),
    ),
    (
        "tools",
        (
            "headrace.runtime.localkafka",
            "headrace.runtime.recovery",
            "headrace.runtime.pytest_plugin",
            "headrace.runtime.savepoint",
            "headrace.runtime.cli_options",
            "headrace.runtime.cli",
        ),
    ),
    ("facade", ("headrace",)),
]


def layer_of(module: str) -> int:
    best, rank = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            # the facade is the package itself, not everything under it
            inside = module == p or (
                p not in ("headrace", "headrace.runtime") and module.startswith(p + ".")
            )
            if inside and len(p) > best:
                best, rank = len(p), i
    assert rank >= 0, f"{module} is in no layer: add it to LAYERS"
    return rank


def modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for folder in ("operators", "runtime"):
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = ["headrace", *rel.parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    out["headrace"] = REPO / "headrace" / "__init__.py"
    return out


def imports_of(name: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in found if m == "headrace" or m.startswith("headrace.")}


def test_no_module_imports_from_a_higher_layer() -> None:
    mods = modules()
    violations = []
    for name, path in mods.items():
        mine = layer_of(name)
        for imported in imports_of(name, path):
            target = imported
            while target not in mods and "." in target:
                target = target.rpartition(".")[0]  # a name imported from a module
            if target not in mods or target == name:
                continue
            theirs = layer_of(target)
            if theirs > mine:
                violations.append(
                    f"{name} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})"
                )
    assert not violations, "imports against the layers:\n" + "\n".join(sorted(violations))


def test_no_import_cycles_between_modules() -> None:
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for imported in imports_of(name, path):
            target = imported
            while target not in mods and "." in target:
                target = target.rpartition(".")[0]
            # a package's __init__ re-exporting its own modules is not a cycle of the design
            if target in mods and target != name and not name.startswith(target + "."):
                deps.add(target)
        graph[name] = deps
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


#: modules known to be too long, each with what is to become of it (not a licence: shrink it)
KNOWN_TOO_LONG: dict[str, int] = {}


def test_no_module_is_over_500_lines_unless_it_says_why() -> None:
    too_long = []
    for name, path in modules().items():
        if name in KNOWN_TOO_LONG and path.read_text().count("\n") <= KNOWN_TOO_LONG[name]:
            continue
        lines = path.read_text().count("\n")
        if lines > 500 and "must be one unit" not in path.read_text()[:4000]:
            too_long.append(f"{name}: {lines} lines")
    assert not too_long, "\n".join(too_long)
