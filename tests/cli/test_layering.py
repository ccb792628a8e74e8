"""Layering: nothing under libs/ imports the services (`services.*`).

The CLI (libs/cli) and the libraries it uses are client code; the services depend on the
libraries, never the other way round. Code both sides need (e.g. reading price files,
libs/barfiles) lives in a library. Imports are found with `ast` at any depth: module level,
inside functions, under `if TYPE_CHECKING:`, relative ones resolved, and
`importlib.import_module("...")` / `__import__("...")` with a literal name.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Final

from tests.imports import ROOT, file_imports, imported_names, is_under, module_name

# module -> why it may import services.* (each entry must still be needed: see below).
EXEMPT: Final = {
    # Renders .env.example and the kustomize settings file from every service's settings
    # model: listing the services' settings is its whole job (imported inside a function).
    # A development tool run as `python -m libs.common.envdoc` (`make env-example`), and no
    # other module under libs/ imports it (checked below), so no library, nor the CLI,
    # reaches the services through it.
    "libs.common.envdoc": "lists every service's settings models",
}


def _library_imports() -> dict[str, set[str]]:
    return {module_name(path): file_imports(path) for path in sorted((ROOT / "libs").rglob("*.py"))}


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
        module: sorted(n for n in names if is_under(n, "services"))
        for module, names in imports.items()
        if module not in EXEMPT and any(is_under(n, "services") for n in names)
    }
    assert offenders == {}, "libs/ must not import services.*: move the shared code to libs/"


def test_every_exemption_is_still_needed_and_contained() -> None:
    imports = _library_imports()
    for module in EXEMPT:
        assert any(is_under(n, "services") for n in imports[module]), f"{module}: drop it"
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
