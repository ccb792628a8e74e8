"""A real PostgreSQL server for the tests: the `pgserver` wheel's PostgreSQL 16 (with
pgvector), started in a directory of the test run, or the server named by
`FINSIGHT_TEST_DATABASE_URL`. Each test gets a database of its own."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import psycopg

from libs.common import pglocal
from libs.common.pg import with_database


class PostgresServer:
    def __init__(self, admin_url: str, data_dir: Path | None = None) -> None:
        self.admin_url = admin_url
        self.data_dir = data_dir  # None: a server this process did not start

    @classmethod
    def for_tests(cls, data_dir: Path) -> PostgresServer:
        given = os.environ.get("FINSIGHT_TEST_DATABASE_URL")
        if given:
            return cls(given)
        return cls.start(data_dir)

    @classmethod
    def start(cls, data_dir: Path) -> PostgresServer:
        """Start a private server in `data_dir` (Unix socket only, no TCP port); again
        after `stop()`, on the same data and socket."""
        return cls(pglocal.start(data_dir), data_dir)

    def execute(self, sql: str, dbname: str | None = None) -> None:
        url = self.admin_url if dbname is None else with_database(self.admin_url, dbname)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.encode())

    def create_database(self, prefix: str = "t") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:16]}"
        self.execute(f'CREATE DATABASE "{name}"')
        return with_database(self.admin_url, name)

    def drop_database(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        if self.data_dir is not None:
            pglocal.stop(self.data_dir)
            self.data_dir = None
