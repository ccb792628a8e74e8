"""Import layering: the gateway's settings and its routing table do not import each other,
and the dev provider (libs/devprovider) and the services do not import each other."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.imports import ROOT, file_imports, imported_names, is_under, module_name


def test_the_catalog_does_not_import_the_settings_module() -> None:
    code = (
        "import sys, services.llm_gateway.catalog; "
        "assert 'services.llm_gateway.config' not in sys.modules, 'catalog imports config'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# -- the dev provider (libs/devprovider) is a development tool, not part of the gateway --

DEVPROVIDER = "libs.devprovider"
_DEV_RE = rf"{re.escape(DEVPROVIDER)}(?:\.\w+)*"


def _imports(source: str, module: str, *, is_package: bool = False) -> set[str]:
    return imported_names(source, module, is_package=is_package, named_in_strings=_DEV_RE)


def _file_imports(path: Path) -> set[str]:
    return file_imports(path, named_in_strings=_DEV_RE)


def test_the_import_scan_sees_every_form() -> None:
    source = (
        "import libs.devprovider.server\n"
        "from libs import devprovider\n"
        "from .wire import Request\n"
        "def f():\n"
        "    from services.llm_gateway import config\n"
        "    return importlib.import_module('libs.devprovider')\n"
    )
    names = _imports(source + "cmd = ['python', '-m', 'libs.devprovider.cli']\n", "libs.x.y")
    assert "libs.devprovider.cli" in _imports("cmd = 'python -m libs.devprovider.cli'", "m")
    assert not _imports('"""Unlike libs.devprovider, this module..."""', "m")
    assert {
        "libs.devprovider.server",
        "libs.devprovider",
        "libs.x.wire",
        "services.llm_gateway.config",
        "libs.devprovider.cli",
    } <= names
    assert "libs.devprovider.wire" in _imports("from . import wire", DEVPROVIDER, is_package=True)


def test_no_production_code_imports_the_dev_provider() -> None:
    """The services, the platform kit and the CLI never import libs.devprovider: it is for
    tests, benchmarks, the system harness and the dev overlay only."""
    production = [
        path
        for folder in ("services", "libs")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if not is_under(module_name(path), DEVPROVIDER)
    ]
    assert any(module_name(p) == "services.llm_gateway.providers" for p in production)
    offenders = {
        str(path.relative_to(ROOT)): found
        for path in production
        if (found := sorted(n for n in _file_imports(path) if is_under(n, DEVPROVIDER)))
    }
    assert offenders == {}
    assert not (ROOT / "services" / "llm_gateway" / "devprovider.py").exists()


def test_the_dev_provider_needs_nothing_from_the_services() -> None:
    """It stands in for DeepSeek, so it shares no code with the gateway (nor with the kit):
    the standard library, its own modules and httpx (imported lazily, by the control client
    only) are all it imports."""
    files = sorted((ROOT / "libs" / "devprovider").rglob("*.py"))
    assert len(files) > 1
    outside = {
        str(path.relative_to(ROOT)): foreign
        for path in files
        if (
            foreign := sorted(
                n
                for n in _file_imports(path)
                if not is_under(n, DEVPROVIDER)
                and n.partition(".")[0] not in sys.stdlib_module_names
                and n != "httpx"
            )
        )
    }
    assert outside == {}
