"""Layering: nothing under libs/ imports the services (`services.*`).

The CLI (libs/cli) and the libraries it uses are client code; the services depend on the
libraries, never the other way round. Code both sides need (e.g. reading price files,
libs/barfiles) lives in a library. Imports are found with `ast` at any depth: module level,
inside functions, under `if TYPE_CHECKING:`, relative ones resolved, and
`importlib.import_module("...")` / `__import__("...")` with a literal name.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Final

ROOT = Path(__file__).resolve().parents[2]

# module -> why it may import services.* (each entry must still be needed: see below).
EXEMPT: Final = {
    # Renders .env.example and the kustomize settings file from every service's settings
    # model: listing the services' settings is its whole job (imported inside a function).
    # A development tool run as `python -m libs.common.envdoc` (`make env-example`), and no
    # other module under libs/ imports it (checked below), so no library, nor the CLI,
    # reaches the services through it.
    "libs.common.envdoc": "lists every service's settings models",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Every module name `source` (the text of `module`) imports, at any depth."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "__import__")
            )
        ):
            names.add(node.args[0].value)
    return names


def _is_under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _library_imports() -> dict[str, set[str]]:
    return {
        _module_name(path): imported_names(
            path.read_text(encoding="utf-8"),
            _module_name(path),
            is_package=path.name == "__init__.py",
        )
        for path in sorted((ROOT / "libs").rglob("*.py"))
    }


def test_the_scan_sees_every_form_of_import() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "import services.memory.main\n"
        "if TYPE_CHECKING:\n"
        "    from services.analytics.importer_cli import Totals\n"
        "def f():\n"
        "    from services import analytics\n"
        "    importlib.import_module('services.llm_gateway.config')\n"
        "    return __import__('services.x')\n"
        "from .. import common\n"
        "from .render import day\n"
    )
    names = imported_names(source, "libs.cli.some")
    assert {
        "services.memory.main",
        "services.analytics.importer_cli",
        "services.analytics",
        "services.llm_gateway.config",
        "services.x",
        "libs.common",
        "libs.cli.render",
    } <= names
    assert imported_names('"""A docstring naming services.analytics."""', "m") == set()


def test_no_library_imports_the_services() -> None:
    imports = _library_imports()
    assert "libs.cli.analytics_cmds" in imports and "libs.barfiles.reader" in imports
    offenders = {
        module: sorted(n for n in names if _is_under(n, "services"))
        for module, names in imports.items()
        if module not in EXEMPT and any(_is_under(n, "services") for n in names)
    }
    assert offenders == {}, "libs/ must not import services.*: move the shared code to libs/"


def test_every_exemption_is_still_needed_and_contained() -> None:
    imports = _library_imports()
    for module in EXEMPT:
        assert any(_is_under(n, "services") for n in imports[module]), f"{module}: drop it"
        importers = [m for m, names in imports.items() if module in names and m != module]
        assert importers == [], f"{module} is exempt only while no library imports it"


def test_the_cli_ingest_path_loads_no_service_module() -> None:
    """The same at run time: the CLI's ingest command and the file library, imported."""
    code = (
        "import sys, libs.cli.main, libs.cli.analytics_cmds, libs.barfiles.ingest; "
        "loaded = sorted(m for m in sys.modules if m == 'services' or m.startswith('services.')); "
        "assert not loaded, loaded"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
