"""The package's layers: imports only go down, and data / models / losses never import each other.

Every ``import`` and ``from ... import`` in every module under ``ibot/`` counts, at module level and
inside functions (a lazy import is still a dependency). ``from ibot import X`` is an import of the
submodule ``ibot.X`` when there is one, else of the module ``ibot/__init__.py`` re-exports ``X`` from
(``from ibot import iBOT`` imports ``ibot.methods``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ibot"

# Each top-level module or package of ibot and its layer; a module may import its own package and any
# lower layer, and the same layer except FORBIDDEN_SIBLINGS. A new top-level module needs a line here.
LAYERS = {
    # 0: foundations, no ibot imports but each other: process groups, devices, checkpoint files, the config schema
    "distributed": 0,
    "device": 0,
    "io": 0,
    "config": 0,
    "grid": 0,  # the mask grid: the cell of an architecture and the loss weights of a mask
    # 1: building blocks over the config schema; siblings
    "data": 1,
    "models": 1,
    "losses": 1,
    # 2: the methods (iBOT, DINO) over the blocks; official checkpoints and timm export over the models
    "methods": 2,
    "official": 2,
    "export": 2,
    "__init__": 2,  # ibot/__init__.py re-exports ibot.methods
    # 3: config / user source -> objects (build_model, resolve_source, load_backbone, data factories)
    "builders": 3,
    # 4: evaluation protocols over any source
    "eval": 4,
    # 5: the applications: training, pictures, the Lightning module, CLI helpers
    "train": 5,
    "viz": 5,
    "lightning": 5,
    "data_setup": 5,  # `data.path=DIR` alone: what a folder holds, the preset fitted to it
    "recipe": 5,  # `data.path=DIR` without a preset: the recipe fitted to the folder and the machine
    "config_help": 5,  # `ibot config --explain`
    # 6: the command line
    "cli": 6,
    "__main__": 6,
}
FORBIDDEN_SIBLINGS = {"data", "models", "losses"}  # the same layer, but independent of each other


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _component(module: str) -> str:
    """The LAYERS key of a module: ``ibot.data.masking`` -> ``data``; the package ``ibot`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _reexports() -> dict[str, str]:
    """Names ``ibot/__init__.py`` imports from a submodule -> that submodule."""
    out = {}
    for node in ast.walk(ast.parse((PACKAGE / "__init__.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ibot."):
            out.update({a.name: node.module for a in node.names})
    return out


def _imports(path: Path, modules: dict[str, Path], reexports: dict[str, str]) -> set[str]:
    """The ibot modules ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name == "ibot" or a.name.startswith("ibot."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "ibot":
                for a in node.names:
                    if f"ibot.{a.name}" in modules:
                        found.add(f"ibot.{a.name}")
                    else:
                        found.add(reexports.get(a.name, "ibot"))
            elif node.module.startswith("ibot."):
                found.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; use absolute `from ibot... import`")
    return found


def violations() -> list[str]:
    modules, reexports = _modules(), _reexports()
    bad = []
    for importer, path in modules.items():
        src = _component(importer)
        for imported in sorted(_imports(path, modules, reexports)):
            dst = _component(imported)
            if src == dst or src not in LAYERS or dst not in LAYERS:
                continue  # a package's own modules; unknown components fail test_every_module_has_a_layer
            a, b = LAYERS[src], LAYERS[dst]
            if b > a or (a == b and src in FORBIDDEN_SIBLINGS and dst in FORBIDDEN_SIBLINGS):
                bad.append(f"{importer} -> {imported} (layer {a} -> layer {b})")
    return bad


def test_every_module_has_a_layer():
    missing = sorted({_component(m) for m in _modules()} - set(LAYERS))
    assert not missing, f"add these ibot modules to LAYERS in {Path(__file__).name}: {', '.join(missing)}"
    stale = sorted(set(LAYERS) - {_component(m) for m in _modules()})
    assert not stale, f"LAYERS names modules that no longer exist: {', '.join(stale)}"


def test_imports_only_go_down():
    bad = violations()
    assert not bad, f"{len(bad)} upward or sibling imports:\n" + "\n".join(bad)


def test_the_checker_sees_lazy_and_package_imports(tmp_path):
    """Function-level imports and ``from ibot import iBOT`` count (a self-check of the walker)."""
    src = tmp_path / "m.py"
    src.write_text(
        "from ibot import iBOT, io\n"
        "def f():\n"
        "    from ibot.train.trainer import Trainer\n"
        "    import ibot.eval.knn\n"
        "from ibot import __version__\n"
    )
    found = _imports(src, _modules(), _reexports())
    assert found == {"ibot.methods", "ibot.io", "ibot.train.trainer", "ibot.eval.knn", "ibot"}


if __name__ == "__main__":  # print the current list
    print("\n".join(violations()) or "no violations")
    pytest.main([__file__, "-q"])
