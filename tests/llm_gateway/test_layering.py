"""The gateway's settings and its routing table do not import each other."""

from __future__ import annotations

import subprocess
import sys


def test_the_catalog_does_not_import_the_settings_module() -> None:
    code = (
        "import sys, services.llm_gateway.catalog; "
        "assert 'services.llm_gateway.config' not in sys.modules, 'catalog imports config'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
