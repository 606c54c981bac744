"""ibot.data, ibot.models and ibot.losses are siblings: none imports another (issue 20)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "ibot"
SIBLINGS = ("data", "models", "losses")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_data_models_and_losses_do_not_import_each_other():
    found = []
    for pkg in SIBLINGS:
        for path in sorted((ROOT / pkg).glob("*.py")):
            for name in _imports(path):
                other = name.split(".")[1] if name.startswith("ibot.") and name.count(".") else None
                if other in SIBLINGS and other != pkg:
                    found.append(f"ibot/{pkg}/{path.name} imports {name}")
    assert not found, found
