"""Registering servicer methods so that undecodable requests become INVALID_ARGUMENT.

protobuf refuses a `string` field holding invalid UTF-8 while *deserialising*, before any
handler runs, and grpc would answer INTERNAL. Here the deserializer catches that, walks
the raw wire format against the message descriptor to name the offending field
(`messages[1].message.content`), and the handler raises InvalidArgument with that field
violation, through the kit's interceptor like any other error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from libs.common.errors import InvalidArgument


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request that could not be parsed."""

    field: str
    description: str

    def error(self) -> InvalidArgument:
        return InvalidArgument.field(self.field, self.description)


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


def find_invalid_utf8(desc: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """Dotted path of the first string field holding invalid UTF-8, if any."""
    seen: dict[int, int] = {}
    i = 0
    try:
        while i < len(data):
            key, i = _varint(data, i)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, i = _varint(data, i)
            elif wire_type == 1:
                i += 8
            elif wire_type == 5:
                i += 4
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


def _deserializer(cls: type[Message]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except DecodeError:
            path = find_invalid_utf8(cls.DESCRIPTOR, data)  # type: ignore[arg-type]
            if path:
                return Undecodable(path, "is not valid UTF-8")
            return Undecodable("(request)", "is not a valid protobuf message")

    return parse


def _unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def handle(request: Any, ctx: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            raise request.error()
        return await behavior(request, ctx)

    return handle


def _server_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def handle(request: Any, ctx: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, Undecodable):
            raise request.error()
        async for item in behavior(request, ctx):
            yield item

    return handle


def add_servicer(
    servicer: object, service: ServiceDescriptor, module: Any, server: grpc.aio.Server
) -> None:
    """Register every method of `service` (unary or server-streaming) on `server`."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        request_cls = getattr(module, method.input_type.name)
        response_cls = getattr(module, method.output_type.name)
        behavior = getattr(servicer, method.name)
        if method.client_streaming:
            raise TypeError(f"{method.name}: client streaming is not supported here")
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _server_stream(behavior),
                request_deserializer=_deserializer(request_cls),
                response_serializer=response_cls.SerializeToString,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(behavior),
                request_deserializer=_deserializer(request_cls),
                response_serializer=response_cls.SerializeToString,
            )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
