"""Malformed transport on the real services' ports: raw garbage, HTTP/1 requests, a broken
HTTP/2 connection, a gRPC path with the wrong content type, truncated and lying gRPC
frames, messages past the size cap, and a crowd of idle half-open connections. After each,
every process still answers health SERVING and a real RPC.
"""

from __future__ import annotations

import asyncio
import os
import struct
from typing import Any

import grpc
import pytest

from finsight.memory.v1 import memory_pb2 as mpb
from tests.fuzz.conftest import Seeded
from tests.fuzz.protofuzz import length_delimited
from tests.security.stack import ANALYTICS, GATEWAY, MEMORY, Stack, call_raw

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PATHS = {
    "memory": f"/{MEMORY.full_name}/GetConsent",
    "analytics": f"/{ANALYTICS.full_name}/ListSymbols",
    "llm_gateway": f"/{GATEWAY.full_name}/ListModels",
}


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def literal(name: str, value: str) -> bytes:
    """HPACK literal header field without indexing, new name, no Huffman coding."""
    n, v = name.encode(), value.encode()
    assert len(n) < 127 and len(v) < 127
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def h2_request(port: int, path: str, content_type: str, body: bytes, key: str) -> bytes:
    headers = b"".join(
        literal(k, v)
        for k, v in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", f"127.0.0.1:{port}"),
            ("content-type", content_type),
            ("te", "trailers"),
            ("authorization", f"Bearer {key}"),
        ]
    )
    return (
        PREFACE
        + frame(0x4, 0, 0, b"")  # SETTINGS
        + frame(0x1, 0x4, 1, headers)  # HEADERS, END_HEADERS
        + frame(0x0, 0x1, 1, body)  # DATA, END_STREAM
    )


async def raw(port: int, payload: bytes, wait: float = 1.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(65536), timeout=wait)
        except TimeoutError:
            return b""
    finally:
        writer.close()


async def still_up(stack: Stack) -> None:
    assert await stack.healthy()
    for process, path in PATHS.items():
        service = {"memory": MEMORY, "analytics": ANALYTICS, "llm_gateway": GATEWAY}[process]
        method = service.methods_by_name[path.rsplit("/", 1)[1]]
        payload = (
            mpb.GetConsentRequest(user_id="u1").SerializeToString() if process == "memory" else b""
        )
        code, _, _ = await call_raw(
            stack.channel(process), service, method, payload, stack.keys.md("alice")
        )
        assert code == grpc.StatusCode.OK, (process, code)


async def test_garbage_http1_and_broken_http2_leave_every_service_up(seeded: Seeded) -> None:
    stack = seeded.stack
    key = stack.keys.base.alice
    for process, path in PATHS.items():
        port = stack.hosts[process].bound_port
        assert port is not None
        grpc_frame = b"\x00" + struct.pack(">I", 2) + b"\x0a\x00"
        attempts = [
            os.urandom(16384),
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST " + path.encode() + b" HTTP/1.1\r\nContent-Type: application/grpc\r\n\r\n",
            PREFACE + os.urandom(2048),  # a valid preface, then junk frames
            PREFACE + frame(0x4, 0, 0, b"\x00\x03\xff\xff\xff\xff"),  # illegal SETTINGS value
            PREFACE + frame(0x1, 0x4, 1, os.urandom(64)),  # HEADERS that are not HPACK
            h2_request(port, path, "application/json", b'{"user_id": "u1"}', key),
            h2_request(port, path, "text/html", b"<html/>", key),
            # gRPC framing that lies: a 4 GiB length prefix, a compressed flag without
            # grpc-encoding, and a truncated frame.
            h2_request(port, path, "application/grpc", b"\x00\xff\xff\xff\xff" + b"x" * 10, key),
            h2_request(port, path, "application/grpc", b"\x01" + grpc_frame[1:], key),
            h2_request(port, path, "application/grpc", grpc_frame[:3], key),
        ]
        for payload in attempts:
            await raw(port, payload)
    await still_up(stack)


async def test_oversized_messages_are_refused_and_services_stay_up(seeded: Seeded) -> None:
    stack = seeded.stack
    huge = length_delimited(1, b"u" * (18 * 1024 * 1024))  # field 1: 18 MiB, cap is 16
    for process, path in PATHS.items():
        service = {"memory": MEMORY, "analytics": ANALYTICS, "llm_gateway": GATEWAY}[process]
        method = service.methods_by_name[path.rsplit("/", 1)[1]]
        channel = grpc.aio.insecure_channel(
            stack.target(process), options=[("grpc.max_send_message_length", -1)]
        )
        async with channel:
            code, _, _ = await call_raw(
                channel, service, method, huge, stack.keys.md("alice"), timeout=30
            )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (process, code)
    await still_up(stack)


@pytest.mark.timeout(60)
async def test_a_crowd_of_idle_connections_does_not_block_service(seeded: Seeded) -> None:
    """300 connections that open, send half a preface and stay silent."""
    stack = seeded.stack
    writers = []
    for process in PATHS:
        port = stack.hosts[process].bound_port
        for _ in range(100):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(PREFACE[:10])
            writers.append(writer)
    try:
        await still_up(stack)
    finally:
        for writer in writers:
            writer.close()
    await still_up(stack)


async def test_errors_of_huge_requests_reach_the_caller_whole(seeded: Seeded) -> None:
    """A request with thousands of bad items is INVALID_ARGUMENT listing the first violations
    and a count of the others; the status stays under gRPC's 8 KiB metadata soft limit (an
    error listing everything would reach the caller as RESOURCE_EXHAUSTED instead). The
    batches stay within their count limits (over them, a request is refused whole with one
    violation): the many violations come from the entries."""
    from finsight.analytics.v1 import analytics_pb2 as apb
    from finsight.analytics.v1 import analytics_pb2_grpc
    from finsight.common.v1 import common_pb2
    from finsight.llm.v1 import llm_gateway_pb2 as gpb
    from finsight.llm.v1 import llm_gateway_pb2_grpc
    from finsight.memory.v1 import memory_pb2_grpc
    from libs.common.errors import status_info
    from tests.security.stack import random_walk_series

    stack = seeded.stack
    md = stack.keys.md("alice")
    mem = memory_pb2_grpc.MemoryServiceStub(stack.channel("memory"))
    gw = llm_gateway_pb2_grpc.LlmGatewayServiceStub(stack.channel("llm_gateway"))
    an = analytics_pb2_grpc.AnalyticsServiceStub(stack.channel("analytics"))
    bad_rows = random_walk_series("FZBAD", 5000, seed=5)
    del bad_rows.volumes[:]
    bad_rows.volumes.extend([-1] * 5000)

    async def ingest() -> Any:
        yield apb.IngestBarsRequest(on_invalid=apb.INVALID_ROW_POLICY_REJECT_ALL, series=[bad_rows])

    calls = {
        "memory": mem.Remember(
            mpb.RememberRequest(
                user_id="u1",
                facts=[
                    mpb.NewFact(kind="bad kind", importance=2.0, tags=["bad tag"] * 8)
                    for _ in range(100)
                ],
            ),
            metadata=md,
            timeout=30,
        ),
        "llm_gateway": gw.Complete(
            gpb.CompleteRequest(messages=[common_pb2.ChatMessage() for _ in range(2000)]),
            metadata=md,
            timeout=30,
        ),
        "analytics": an.IngestBars(ingest(), metadata=stack.keys.md("alice_writer"), timeout=30),
    }
    for process, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        info = status_info(err.value)
        assert info.code == grpc.StatusCode.INVALID_ARGUMENT, (process, info.code, info.message)
        assert 20 <= len(info.field_violations) < 300, (process, len(info.field_violations))
        size = sum(len(k) + len(v) for k, v in err.value.trailing_metadata() or ())
        size += len((err.value.details() or "").encode())
        assert size < 8 * 1024, (process, size)
        if process != "analytics":  # analytics lists the first 100 rows itself
            last = info.field_violations[-1]
            assert last.field == "(request)" and "more violations not listed" in last.description
