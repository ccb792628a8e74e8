"""Render `docs/api.md` from the proto files and their comments.

    python -m libs.common.apidoc > docs/api.md        (or `make docs`)

Every service, RPC, message, field and enum of the `finsight.*` packages,
with the comments written in the .proto files (units, limits, defaults and
error reasons belong there). A test fails when docs/api.md is stale.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
DEPS = ROOT / ".build" / "proto-deps"

# SourceCodeInfo path tags (descriptor.proto field numbers).
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MSG_FIELD, _MSG_NESTED, _MSG_ENUM = 2, 3, 4
_ENUM_VALUE, _SERVICE_METHOD = 2, 2

_SCALARS = {
    1: "double",
    2: "float",
    3: "int64",
    4: "uint64",
    5: "int32",
    6: "fixed64",
    7: "fixed32",
    8: "bool",
    9: "string",
    12: "bytes",
    13: "uint32",
    15: "sfixed32",
    16: "sfixed64",
    17: "sint32",
    18: "sint64",
}


def proto_files() -> list[Path]:
    return sorted(PROTOS.rglob("finsight/**/*.proto"))


def descriptor_set(files: Sequence[Path]) -> descriptor_pb2.FileDescriptorSet:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{DEPS}",
            f"--descriptor_set_out={out}",
            "--include_source_info",
            *[str(f.relative_to(PROTOS)) for f in files],
        ]
        subprocess.run(cmd, check=True, cwd=PROTOS)
        fds = descriptor_pb2.FileDescriptorSet()
        fds.ParseFromString(out.read_bytes())
        return fds


def _comments(fd: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    out = {}
    for loc in fd.source_code_info.location:
        text = (loc.leading_comments or loc.trailing_comments).strip()
        if text:
            out[tuple(loc.path)] = " ".join(line.strip() for line in text.splitlines())
    return out


def _type_name(field: descriptor_pb2.FieldDescriptorProto) -> str:
    base = field.type_name.lstrip(".") if field.type_name else _SCALARS.get(field.type, "?")
    if field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
        return f"repeated {base}"
    if field.proto3_optional:
        return f"optional {base}"
    return base


def _cell(text: str) -> str:
    return text.replace("|", "\\|") or "—"


def _enum(
    enum: descriptor_pb2.EnumDescriptorProto,
    full: str,
    path: tuple[int, ...],
    comments: dict[tuple[int, ...], str],
) -> Iterator[str]:
    yield f"### enum `{full}`\n"
    if path in comments:
        yield comments[path] + "\n"
    yield "| value | number | description |\n|---|---|---|"
    for i, value in enumerate(enum.value):
        yield f"| `{value.name}` | {value.number} | {_cell(comments.get((*path, _ENUM_VALUE, i), ''))} |"
    yield ""


def _message(
    msg: descriptor_pb2.DescriptorProto,
    full: str,
    path: tuple[int, ...],
    comments: dict[tuple[int, ...], str],
) -> Iterator[str]:
    if msg.options.map_entry:
        return
    yield f"### `{full}`\n"
    if path in comments:
        yield comments[path] + "\n"
    if msg.field:
        yield "| field | type | description |\n|---|---|---|"
        for i, field in enumerate(msg.field):
            text = comments.get((*path, _MSG_FIELD, i), "")
            yield f"| `{field.name}` | `{_type_name(field)}` | {_cell(text)} |"
    else:
        yield "_No fields._"
    yield ""
    for i, nested in enumerate(msg.nested_type):
        yield from _message(nested, f"{full}.{nested.name}", (*path, _MSG_NESTED, i), comments)
    for i, enum in enumerate(msg.enum_type):
        yield from _enum(enum, f"{full}.{enum.name}", (*path, _MSG_ENUM, i), comments)


def render(fds: descriptor_pb2.FileDescriptorSet) -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the comments in `protos/` by `make docs` "
        "(`python -m libs.common.apidoc`); do not edit by hand.",
        "Errors are gRPC status codes with `google.rpc` details: `BadRequest` field violations "
        "for INVALID_ARGUMENT, `ErrorInfo` (domain `finsight.dev`) with a stable `reason`, "
        "`RetryInfo` where a retry may succeed and `QuotaFailure` for limits and budgets. "
        "Every RPC needs `authorization: Bearer <key>`; see docs/configuration.md.",
        "",
    ]
    for fd in sorted(fds.file, key=lambda f: f.name):
        if not fd.package.startswith("finsight."):
            continue
        comments = _comments(fd)
        lines += [f"## `{fd.package}` — `{fd.name}`", ""]
        for s_i, service in enumerate(fd.service):
            path = (_FILE_SERVICE, s_i)
            lines.append(f"### service `{fd.package}.{service.name}`\n")
            if path in comments:
                lines.append(comments[path] + "\n")
            if service.method:
                lines.append("| RPC | request | response | description |\n|---|---|---|---|")
            for m_i, method in enumerate(service.method):
                req = ("stream " if method.client_streaming else "") + method.input_type.lstrip(".")
                res = ("stream " if method.server_streaming else "") + method.output_type.lstrip(
                    "."
                )
                text = comments.get((*path, _SERVICE_METHOD, m_i), "")
                lines.append(f"| `{method.name}` | `{req}` | `{res}` | {_cell(text)} |")
            lines.append("")
        for i, msg in enumerate(fd.message_type):
            lines.extend(_message(msg, f"{fd.package}.{msg.name}", (_FILE_MESSAGE, i), comments))
        for i, enum in enumerate(fd.enum_type):
            lines.extend(_enum(enum, f"{fd.package}.{enum.name}", (_FILE_ENUM, i), comments))
    return "\n".join(lines).rstrip() + "\n"


def undocumented(fds: descriptor_pb2.FileDescriptorSet) -> list[str]:
    """RPCs and fields without a comment (a caller would have to guess)."""
    missing = []
    for fd in fds.file:
        if not fd.package.startswith("finsight."):
            continue
        comments = _comments(fd)
        for s_i, service in enumerate(fd.service):
            for m_i, method in enumerate(service.method):
                if (_FILE_SERVICE, s_i, _SERVICE_METHOD, m_i) not in comments:
                    missing.append(f"{fd.package}.{service.name}.{method.name}")

        for i, msg in enumerate(fd.message_type):
            missing.extend(
                _undocumented_fields(msg, f"{fd.package}.{msg.name}", (_FILE_MESSAGE, i), comments)
            )
    return missing


def _undocumented_fields(
    msg: descriptor_pb2.DescriptorProto,
    full: str,
    path: tuple[int, ...],
    comments: dict[tuple[int, ...], str],
) -> list[str]:
    if msg.options.map_entry:
        return []
    out = [
        f"{full}.{field.name}"
        for f_i, field in enumerate(msg.field)
        if (*path, _MSG_FIELD, f_i) not in comments
    ]
    for n_i, nested in enumerate(msg.nested_type):
        out += _undocumented_fields(
            nested, f"{full}.{nested.name}", (*path, _MSG_NESTED, n_i), comments
        )
    return out


if __name__ == "__main__":
    print(render(descriptor_set(proto_files())), end="")
