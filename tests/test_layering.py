"""The layers, read from the source (AST, every import statement: module level and inside functions).

- the core (``benchmark/``) imports no plug-in (``methods``, ``baselines``): it reaches them through the one
  discovery list, ``benchmark.method_api.PLUGINS``, by name;
- ``methods/`` does not import ``baselines/`` (sibling plug-in packages; both import the core only);
- mmengine is imported in ``benchmark/engine.py`` only;
- the leaderboard imports no torch (nor timm, peft, mmengine, ...), directly or through any module of this
  repository it imports, transitively;
- every plug-in module file is in the discovery list (a file missing there would never register) and every entry
  of the list is a file.

The checker runs on this repository and on small trees written for the purpose, each with one violation, so that
it is known to fail when a rule is broken.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmark.method_api import PLUGINS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("benchmark", "methods", "baselines", "leaderboard")
PLUGIN_PACKAGES = ("methods", "baselines")
HEAVY = ("torch", "timm", "peft", "mmengine", "mmseg", "mmcv", "torchvision")  # what the leaderboard must not load
ENGINE_ONLY = {"mmengine": "benchmark/engine.py"}


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(root: Path, path: Path) -> Iterator[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in the file, wherever it stands; ``from a import b`` gives
    ``a.b`` as well as ``a`` (b may be a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module_name(root, path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if package else []
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield node.lineno, mod
            for alias in node.names:
                yield node.lineno, f"{mod}.{alias.name}"
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Attribute, ast.Name))
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value  # importlib.import_module("methods.x"): an import all the same


def _top(name: str) -> str:
    return name.split(".")[0]


def _files(root: Path, package: str) -> list[Path]:
    return sorted((root / package).rglob("*.py")) if (root / package).is_dir() else []


def _resolve(root: Path, name: str) -> Path | None:
    """The file of a module of this repository, None for anything else (or a name that is an attribute)."""
    if _top(name) not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _reachable(root: Path, start: Path) -> dict[Path, list[Path]]:
    """Every repository module ``start`` imports, transitively: ``{file: the import chain that reaches it}``.
    The packages of a module are imported with it (``import a.b`` runs ``a/__init__.py``)."""
    chains: dict[Path, list[Path]] = {start: [start]}
    todo = [start]
    while todo:
        cur = todo.pop()
        for _, name in imports_of(root, cur):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                target = _resolve(root, ".".join(parts[:i]))
                if target is not None and target not in chains:
                    chains[target] = chains[cur] + [target]
                    todo.append(target)
    return chains


def violations(root: Path, plugins: tuple[str, ...]) -> list[str]:
    """Every broken layering rule in the tree at ``root``, one line each (file:line and what)."""
    out: list[str] = []

    def rel(p: Path) -> str:
        return p.relative_to(root).as_posix()

    for package in PACKAGES:
        for path in _files(root, package):
            for line, name in imports_of(root, path):
                top = _top(name)
                if package == "benchmark" and top in PLUGIN_PACKAGES:
                    out.append(f"{rel(path)}:{line}: the core imports the plug-in {name}")
                if package == "methods" and top == "baselines":
                    out.append(f"{rel(path)}:{line}: methods/ imports baselines/ ({name})")
                if top in ENGINE_ONLY and rel(path) != ENGINE_ONLY[top]:
                    out.append(f"{rel(path)}:{line}: imports {name}; only {ENGINE_ONLY[top]} may import {top}")
    for path in _files(root, "leaderboard"):
        for dep, chain in _reachable(root, path).items():
            for line, name in imports_of(root, dep):
                if _top(name) in HEAVY:
                    via = " -> ".join(rel(p) for p in chain)
                    out.append(f"{rel(dep)}:{line}: imports {name}, reached from the leaderboard ({via})")
    files = {_module_name(root, p) for pkg in PLUGIN_PACKAGES for p in _files(root, pkg) if p.name != "__init__.py"}
    for module in sorted(files - set(plugins)):
        out.append(f"{module}: a plug-in module missing from benchmark.method_api.PLUGINS (it would never register)")
    for module in sorted(set(plugins) - files):
        out.append(f"{module}: listed in benchmark.method_api.PLUGINS but no such file")
    return sorted(set(out))


def test_this_repository_keeps_its_layers() -> None:
    found = violations(ROOT, PLUGINS)
    assert not found, "layering violations:\n" + "\n".join(found)


def test_plugins_list_has_no_duplicates() -> None:
    assert len(PLUGINS) == len(set(PLUGINS))


# --------------------------------------------------------------------------- the checker fails when a rule breaks

CLEAN = {
    "benchmark/__init__.py": "",
    "benchmark/core.py": "import json\nfrom benchmark import util\n",
    "benchmark/util.py": "X = 1\n",
    "benchmark/engine.py": "import mmengine\nfrom mmengine.runner import Runner\n",
    "benchmark/heavy.py": "import torch\n",
    "methods/__init__.py": "",
    "methods/m1.py": "from benchmark.core import json\n",
    "baselines/__init__.py": "",
    "baselines/b1.py": "from methods.m1 import json\nfrom benchmark import util\n",
    "leaderboard/__init__.py": "",
    "leaderboard/cli.py": "from benchmark import util\nfrom . import tables\n",
    "leaderboard/tables.py": "import json\n",
}
PLUGINS_CLEAN = ("methods.m1", "baselines.b1")


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_the_checker_passes_a_clean_tree(tmp_path: Path) -> None:
    assert violations(_tree(tmp_path, CLEAN), PLUGINS_CLEAN) == []


@pytest.mark.parametrize(
    ("change", "plugins", "expected"),
    [
        (
            {"benchmark/util.py": "def f():\n    from methods import m1\n"},
            PLUGINS_CLEAN,
            "the core imports the plug-in",
        ),
        ({"benchmark/util.py": "import baselines.b1\n"}, PLUGINS_CLEAN, "the core imports the plug-in baselines.b1"),
        (
            {"benchmark/util.py": "import importlib\nimportlib.import_module('methods.m1')\n"},
            PLUGINS_CLEAN,
            "the core imports the plug-in methods.m1",
        ),
        (
            {"methods/m1.py": "def f():\n    from baselines.b1 import x\n"},
            PLUGINS_CLEAN,
            "methods/ imports baselines/",
        ),
        (
            {"benchmark/core.py": "from mmengine.logging import MessageHub\n"},
            PLUGINS_CLEAN,
            "only benchmark/engine.py",
        ),
        ({"methods/m1.py": "import mmengine\n"}, PLUGINS_CLEAN, "methods/m1.py:1: imports mmengine"),
        ({"leaderboard/tables.py": "import torch\n"}, PLUGINS_CLEAN, "leaderboard/tables.py:1: imports torch"),
        # torch reached through a core module the leaderboard imports, two steps away, inside a function
        (
            {"benchmark/util.py": "from benchmark import heavy\n"},
            PLUGINS_CLEAN,
            "benchmark/heavy.py:1: imports torch, reached from the leaderboard (leaderboard/cli.py -> "
            "benchmark/util.py -> benchmark/heavy.py)",
        ),
        (
            {"leaderboard/tables.py": "def f():\n    import benchmark.heavy\n"},
            PLUGINS_CLEAN,
            "benchmark/heavy.py:1: imports torch, reached from the leaderboard",
        ),
        ({"baselines/b2.py": "X = 1\n"}, PLUGINS_CLEAN, "baselines.b2: a plug-in module missing from"),
        ({}, (*PLUGINS_CLEAN, "methods.gone"), "methods.gone: listed in benchmark.method_api.PLUGINS but no such"),
    ],
)
def test_the_checker_finds_each_violation(tmp_path: Path, change: dict, plugins: tuple, expected: str) -> None:
    found = violations(_tree(tmp_path, {**CLEAN, **change}), plugins)
    assert any(expected in v for v in found), found
