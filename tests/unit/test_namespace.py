"""headrace occupies one top-level import name: nothing it ships imports ``operators`` or
``runtime`` as top-level modules.

In the checkout those names resolve to the source folders (the editable install puts the
repository on ``sys.path``), so such an import would work here and break, or import the user's
own ``operators.py`` or ``runtime/`` package, in an installed wheel. tests/packaging proves the
wheel with a user project that has both; this catches the import before a wheel is built.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GENERIC = {"operators", "runtime"}


def test_no_shipped_module_imports_a_generic_top_level_name() -> None:
    offenders = []
    files = [REPO / "headrace" / "__init__.py"]
    for folder in ("operators", "runtime"):
        files += sorted((REPO / folder).rglob("*.py"))
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                if name.split(".")[0] in GENERIC:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}")
    assert not offenders, "import through headrace.* instead:\n" + "\n".join(offenders)
