"""TLS / mutual TLS through the kit's server and channel factory; log redaction."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import grpc
import pytest

from libs.common.clients import create_channel
from libs.common.logging import JsonFormatter, ThrottledLog, redact
from tests.common.conftest import SERVICE, EchoSettings, start_echo
from tests.conftest import Keys, make_settings
from tests.pki import make_pki


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    return make_pki(tmp_path)


async def _echo_via(channel: grpc.aio.Channel, keys: Keys) -> bytes:
    return await channel.unary_unary(f"/{SERVICE}/Echo")(  # type: ignore[no-any-return]
        b"hi", metadata=keys.metadata(keys.alice), timeout=5
    )


@pytest.mark.parametrize("mutual", [False, True])
async def test_tls_end_to_end_and_plaintext_refused(
    tmp_path: Path, redis_url: str, api_keys: Keys, pki: dict[str, Path], mutual: bool
) -> None:
    echo = await start_echo(
        tmp_path,
        redis_url,
        api_keys,
        finsight_tls_cert_file=pki["server_cert"],
        finsight_tls_key_file=pki["server_key"],
        finsight_tls_client_ca_file=pki["ca"] if mutual else None,
    )
    target = f"localhost:{echo.host.bound_port}"
    try:
        client_settings = make_settings(
            EchoSettings,
            tmp_path,
            redis_url,
            None,
            finsight_tls_ca_file=pki["ca"],
            finsight_tls_cert_file=pki["client_cert"],
            finsight_tls_key_file=pki["client_key"],
        )
        async with create_channel(target, client_settings) as channel:
            assert await _echo_via(channel, api_keys) == b"hi"

        async with grpc.aio.insecure_channel(target) as plaintext:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _echo_via(plaintext, api_keys)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        if mutual:  # trusts the server, but presents no certificate
            anonymous = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
            async with grpc.aio.secure_channel(target, anonymous) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _echo_via(channel, api_keys)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await echo.close()


def test_log_lines_redact_keys_and_known_secrets() -> None:
    redact.add_values(["provider-secret-value-123"])
    record = logging.LogRecord(
        "x",
        logging.INFO,
        __file__,
        1,
        "calling with Bearer fsk_abcdefghijkl and sk-0123456789abcdef "
        "and provider-secret-value-123 api_key=zzzzzzzz",
        (),
        None,
    )
    line = JsonFormatter("test").format(record)
    entry = json.loads(line)
    for secret in (
        "fsk_abcdefghijkl",
        "sk-0123456789abcdef",
        "provider-secret-value-123",
        "zzzzzzzz",
    ):
        assert secret not in line
    assert entry["msg"].count("[REDACTED]") == 4


def test_a_recurring_warning_is_logged_once_per_interval_with_the_count_it_held_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    throttled = ThrottledLog(
        logging.getLogger("throttle-test"), interval_s=10, clock=lambda: now[0]
    )
    with caplog.at_level(logging.WARNING, logger="throttle-test"):
        for _ in range(500):  # a burst of requests while Redis is away
            throttled.warning("redis unavailable", extra={"error": "ConnectionError"})
            throttled.warning("cache read failed")
            now[0] += 0.01  # 5 s in all
        now[0] += 5.0
        throttled.warning("redis unavailable", extra={"error": "ConnectionError"})
    lines = [(r.getMessage(), r.__dict__["suppressed"]) for r in caplog.records]
    assert lines == [("redis unavailable", 0), ("cache read failed", 0), ("redis unavailable", 499)]
    assert caplog.records[-1].__dict__["error"] == "ConnectionError"
