"""Sentry-compatible reporting: one event per unexpected exception, scrubbed, offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest
import sentry_sdk
from sentry_sdk.transport import Transport

from libs.common import error_reporting
from libs.common.errors import status_info
from tests.common.conftest import start_echo
from tests.conftest import Keys


class CapturingTransport(Transport):
    """Keeps envelopes in memory instead of sending them anywhere."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.events: list[dict[str, Any]] = []

    def capture_envelope(self, envelope: Any) -> None:
        for item in envelope.items:
            if item.type == "event":
                self.events.append(json.loads(item.payload.get_bytes()))


@pytest.fixture
def transport() -> Any:
    transport = CapturingTransport()
    error_reporting.configure_error_reporting(
        "https://public@sentry.invalid/1",
        service="echo",
        release="1.2.3",
        environment="staging",
        transport=transport,
    )
    yield transport
    sentry_sdk.init(dsn=None)
    error_reporting._enabled = False


async def test_unexpected_exception_reported_once_with_the_client_error_id(
    tmp_path: Path, redis_url: str, api_keys: Keys, transport: CapturingTransport
) -> None:
    echo = await start_echo(tmp_path, redis_url, api_keys)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await echo.unary("Boom")(b"", metadata=api_keys.metadata(api_keys.alice))
        with pytest.raises(grpc.aio.AioRpcError):
            await echo.unary("Invalid")(b"", metadata=api_keys.metadata(api_keys.alice))
    finally:
        await echo.close()
    sentry_sdk.flush()
    error_id = status_info(err.value).metadata["error_id"]
    assert len(transport.events) == 1
    event = transport.events[0]
    assert event["tags"]["error_id"] == error_id
    assert event["tags"]["rpc"] == "test.v1.EchoService/Boom"
    assert (event["release"], event["environment"]) == ("1.2.3", "staging")
    text = json.dumps(event)
    assert "hunter2" not in text, "secrets are scrubbed"
    assert "k-alice" not in text, "API keys never leave the process"
    assert '"vars"' not in text, "no local variables"
