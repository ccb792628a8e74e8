"""The provider client's wire: the aiohttp transport must behave like httpx's own (httpcore)
in every way the gateway relies on: answers, errors by kind, Retry-After, timeouts, cut
streams, cancellation, connection reuse, proxies from the environment."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from libs.devprovider import DEFAULT_API_KEY, DevProvider, DevProviderControl
from services.llm_gateway.providers import ProviderClient, ProviderError
from services.llm_gateway.transport import AiohttpTransport, env_proxy
from tests.conftest import free_port
from tests.llm_gateway.conftest import GatewayFactory, dev_provider_spec

TRANSPORTS = ["aiohttp", "httpcore"]
BODY = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi there"}]}


def _client(base_url: str, transport: str, *, read_s: float = 5.0) -> ProviderClient:
    return ProviderClient(
        dev_provider_spec(base_url, max_connections=8),
        shards=2,
        connect_s=2.0,
        read_s=read_s,
        write_s=2.0,
        pool_s=2.0,
        keepalive_expiry_s=30.0,
        transport=transport,
    )


@pytest.fixture(params=TRANSPORTS)
async def client(
    request: pytest.FixtureRequest, provider: DevProvider
) -> AsyncIterator[ProviderClient]:
    c = _client(provider.base_url, request.param)
    yield c
    await c.aclose()


async def test_answer_and_connection_reuse(
    client: ProviderClient, control: DevProviderControl
) -> None:
    answers = [await client.complete(BODY, timeout_s=5) for _ in range(3)]
    assert [a.content for a in answers] == ["echo: hi there"] * 3
    assert answers[0].usage is not None and answers[0].usage.prompt > 0
    requests = await control.requests()
    assert [r["headers"]["authorization"] for r in requests] == [f"Bearer {DEFAULT_API_KEY}"] * 3
    assert requests[0]["headers"]["content-type"] == "application/json"


async def test_keep_alive_reuses_one_connection(provider: DevProvider) -> None:
    # Sequential requests over the aiohttp transport ride one pooled connection.
    client = _client(provider.base_url, "aiohttp")
    try:
        for _ in range(3):
            await client.complete(BODY, timeout_s=5)
        transport = client._transports[0]
        assert isinstance(transport, AiohttpTransport) and transport._session is not None
        connector = transport._session.connector
        assert connector is not None
        assert sum(len(conns) for conns in connector._conns.values()) == 1  # type: ignore[attr-defined]
    finally:
        await client.aclose()


async def test_status_error_carries_status_message_and_retry_after(
    client: ProviderClient, control: DevProviderControl
) -> None:
    await control.script({"status": 429, "retry_after": 3, "message": "slow down"})
    with pytest.raises(ProviderError) as err:
        await client.complete(BODY, timeout_s=5)
    assert err.value.status == 429 and err.value.retry_after == 3.0
    assert "slow down" in err.value.message
    # The connection survives an error answer.
    assert (await client.complete(BODY, timeout_s=5)).content == "echo: hi there"


@pytest.mark.parametrize(
    ("action", "kind"),
    [({"drop": True}, "protocol"), ({"cut_after_chunks": 1}, "protocol")],
)
async def test_broken_answers_are_protocol_errors(
    client: ProviderClient, control: DevProviderControl, action: dict[str, object], kind: str
) -> None:
    await control.script(action)
    with pytest.raises(ProviderError) as err:
        await client.complete(BODY, timeout_s=5)
    assert err.value.kind == kind and err.value.status is None and err.value.retryable
    assert (await client.complete(BODY, timeout_s=5)).content == "echo: hi there"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_idle_read_timeout_and_absolute_deadline_are_timeouts(
    transport: str, provider: DevProvider, control: DevProviderControl
) -> None:
    client = _client(provider.base_url, transport, read_s=0.3)
    try:
        await control.script({"hang": True})
        with pytest.raises(ProviderError) as err:
            await client.complete(BODY, timeout_s=5)  # httpx read timeout (idle)
        assert err.value.kind == "timeout"
        await control.script({"keepalive_lines": 1000, "keepalive_interval_ms": 50})
        with pytest.raises(ProviderError) as err:
            await client.complete(BODY, timeout_s=0.5)  # bytes keep flowing: absolute deadline
        assert err.value.kind == "timeout"
    finally:
        await client.aclose()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_refused_connection_is_a_connect_error(transport: str) -> None:
    client = _client(f"http://127.0.0.1:{free_port()}/v1", transport)
    try:
        with pytest.raises(ProviderError) as err:
            await client.complete(BODY, timeout_s=5)
        assert err.value.kind == "connect"
    finally:
        await client.aclose()


async def test_stream_deltas_usage_and_cut(
    client: ProviderClient, control: DevProviderControl
) -> None:
    async with client.stream({**BODY, "messages": [{"role": "user", "content": "a b c"}]}) as s:
        parts = []
        while (delta := await s.next_delta()) is not None:
            parts.append(delta.content)
    assert "".join(parts) == "echo: a b c"
    assert s.state.usage is not None and s.state.finish_reason == "stop"

    await control.script({"cut_after_chunks": 2})
    async with client.stream(BODY) as s:
        with pytest.raises(ProviderError) as err:
            while await s.next_delta() is not None:
                pass
    assert err.value.kind == "protocol"


async def test_leaving_an_unfinished_stream_cancels_the_provider_request(
    client: ProviderClient, control: DevProviderControl
) -> None:
    await control.script({"chunk_delay_ms": 200, "content": "one two three four five six"})
    async with client.stream(BODY) as s:
        assert await s.next_delta() is not None
    for _ in range(50):
        requests = await control.requests()
        if requests and requests[-1]["cancelled"]:
            break
        await asyncio.sleep(0.05)
    assert requests[-1]["cancelled"], requests[-1]


def test_proxy_environment_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    assert env_proxy("https://api.deepseek.com/chat/completions") == "http://proxy.internal:3128"
    assert env_proxy("http://127.0.0.1:8089/v1/chat/completions") is None
    monkeypatch.delenv("HTTPS_PROXY")
    assert env_proxy("https://api.deepseek.com/chat/completions") is None


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_requests_go_through_the_environments_proxy(
    transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in proxy (a raw socket server) sees the absolute-form request line."""
    seen: list[bytes] = []
    body = b'{"choices":[{"message":{"content":"via proxy"},"finish_reason":"stop"}]}'

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head.split(b"\r\n", 1)[0])
        length = int(
            next(
                line.split(b":", 1)[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
        )
        await reader.readexactly(length)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = _client("http://provider.example:8089/v1", transport)
    try:
        answer = await client.complete(BODY, timeout_s=5)
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
    assert answer.content == "via proxy"
    assert seen == [b"POST http://provider.example:8089/v1/chat/completions HTTP/1.1"]


async def test_gateway_on_the_httpcore_transport(
    gateway_with: GatewayFactory, control: DevProviderControl
) -> None:
    """The httpcore transport stays a working option (and the benchmark's comparison)."""
    gw = await gateway_with(llm_gateway_http_transport="httpcore")
    await control.script({"status": 503})
    reply = await gw.complete("over httpcore")
    assert reply.content == "echo: over httpcore" and reply.attempts == 2


def test_transport_is_an_httpx_transport() -> None:
    transport = AiohttpTransport(max_connections=1, keepalive_expiry_s=1.0)
    assert isinstance(transport, httpx.AsyncBaseTransport)
