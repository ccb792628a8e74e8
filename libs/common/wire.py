"""Requests that protobuf cannot parse become INVALID_ARGUMENT naming the field.

protobuf refuses a `string` field holding invalid UTF-8 while deserialising,
before any handler runs, and grpcio would answer UNKNOWN/INTERNAL with the
exception's text. The server interceptor swaps each generated handler's
`request_deserializer` for `tolerant(cls)`, which returns an `Undecodable`
marker instead of raising; the interceptor then raises `InvalidArgument` for
it, so every service gets the same answer (`messages[1].content: is not valid
UTF-8`) with no per-service registration code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from libs.common.errors import InvalidArgument


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request message that could not be parsed."""

    field: str
    description: str

    def error(self) -> InvalidArgument:
        return InvalidArgument.field(self.field, self.description)


def message_class(deserializer: Callable[[bytes], Any] | None) -> type[Message] | None:
    """The message class behind a generated deserializer (`XRequest.FromString`)."""
    owner = getattr(deserializer, "__self__", None)
    if isinstance(owner, type) and issubclass(owner, Message):
        return owner
    return None


def tolerant(cls: type[Message]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except DecodeError:
            path = find_invalid_utf8(cls.DESCRIPTOR, data)
            if path:
                return Undecodable(path, "is not valid UTF-8")
            return Undecodable("(request)", "is not a valid protobuf message")

    return parse


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def find_invalid_utf8(desc: Descriptor | Any, data: bytes, prefix: str = "") -> str | None:
    """Dotted path of the first string field holding invalid UTF-8 (a wire-format walk)."""
    seen: dict[int, int] = {}
    i = 0
    try:
        while i < len(data):
            key, i = _varint(data, i)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, i = _varint(data, i)
            elif wire_type in (1, 5):
                i += 8 if wire_type == 1 else 4
            elif wire_type == 2:
                length, i = _varint(data, i)
                chunk, i = data[i : i + length], i + length
                field = desc.fields_by_number.get(number)
                if field is None:
                    continue
                index = seen.get(number, 0)
                seen[number] = index + 1
                sub = field.message_type if field.type == FieldDescriptor.TYPE_MESSAGE else None
                is_map = sub is not None and sub.GetOptions().map_entry
                name = field.name + (f"[{index}]" if field.is_repeated and not is_map else "")
                if field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return prefix + name
                elif sub is not None:
                    found = find_invalid_utf8(sub, chunk, f"{prefix}{name}.")
                    if found:
                        return found
            else:
                return None
    except ValueError:
        return None
    return None
