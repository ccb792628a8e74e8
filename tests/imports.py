"""What a module imports, read with `ast` (the layering tests of tests/cli and
tests/llm_gateway): at any depth (module level, in functions, under `if TYPE_CHECKING:`),
relative imports resolved, `importlib.import_module("...")` / `__import__("...")` with a
literal name, and optionally string constants that name a module (`-m pkg.mod`).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def imported_names(
    source: str, module: str, *, is_package: bool = False, named_in_strings: str = ""
) -> set[str]:
    """Every module name `source` (the text of `module`) imports, at any depth; plus, when
    `named_in_strings` is a regex of module names, string constants that are one (alone or
    after `-m `)."""
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
        elif named_in_strings and isinstance(node, ast.Constant) and isinstance(node.value, str):
            pattern = rf"(?:^|(?<=-m ))({named_in_strings})$"
            names.update(re.findall(pattern, node.value.strip()))
    return names


def file_imports(path: Path, *, named_in_strings: str = "") -> set[str]:
    return imported_names(
        path.read_text(encoding="utf-8"),
        module_name(path),
        is_package=path.name == "__init__.py",
        named_in_strings=named_in_strings,
    )
