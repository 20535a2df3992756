"""The layering rule, read from the source: the commands layer (``pillsnap_dali/commands/``) sits on top, the
library below never imports it (nor the thin ``python -m`` entry points), and ``pipelines/`` imports no
``pillsnap_dali`` at all. Every import counts, also one inside a function."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from pillsnap_dali.commands import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "pillsnap_dali"
ENTRY_POINTS = {f"pillsnap_dali.{name}" for name in COMMANDS}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports (``from a.b import c`` counts as a.b and a.b.c)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def library_modules() -> list[Path]:
    return [p for p in sorted(PKG.rglob("*.py")) if "commands" not in p.relative_to(PKG).parts
            and module_name(p) not in ENTRY_POINTS]


def upward(names: set[str]) -> set[str]:
    return {n for n in names if n == "pillsnap_dali.commands" or n.startswith("pillsnap_dali.commands.")
            or n in ENTRY_POINTS or n in {e.rsplit(".", 1)[0] + " import " + e.rsplit(".", 1)[1] for e in ENTRY_POINTS}}


def test_no_library_module_imports_the_commands_layer():
    offenders = {module_name(p): sorted(upward(imported(p))) for p in library_modules()}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"library modules importing the commands layer: {offenders}"
    assert len(library_modules()) > 40  # the walk found the library (not an empty glob)


def test_the_rule_sees_an_upward_import(tmp_path):
    """The checker itself: an import inside a function, of a command or of an entry point, is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from pillsnap_dali.commands.train import run\n    import pillsnap_dali.predict\n")
    assert upward(imported(bad)) == {"pillsnap_dali.commands.train", "pillsnap_dali.commands.train.run",
                                     "pillsnap_dali.predict"}


def test_pipelines_import_no_pillsnap_dali():
    for p in sorted((ROOT / "pipelines").rglob("*.py")):
        assert not [n for n in imported(p) if n.startswith("pillsnap_dali")], p


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_lives_in_commands_and_runs_by_its_old_name(name):
    cmd = importlib.import_module(f"pillsnap_dali.commands.{name}")
    assert callable(cmd.main)
    entry = importlib.import_module(f"pillsnap_dali.{name}")
    assert entry.main is cmd.main  # the entry point is thin: it runs the command's own main
    # every CLI module is under commands/: no parser is defined anywhere else in the package
    for p in library_modules():
        assert "ArgumentParser(" not in p.read_text(encoding="utf-8"), f"{p} builds a command-line parser"
