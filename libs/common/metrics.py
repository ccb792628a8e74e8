"""Prometheus metrics shared by every service (one registry per process).

gRPC server and client metrics follow go-grpc-prometheus names so stock
dashboards and alerts work unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Metric, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from libs.common import heap

_db_log = logging.getLogger("libs.common.db")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_RPC = ("grpc_service", "grpc_method", "grpc_type")

SERVER_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", _RPC)
SERVER_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    (*_RPC, "grpc_code"),
)
SERVER_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time to handle an RPC on the server.",
    _RPC,
    buckets=_LATENCY_BUCKETS,
)
SERVER_MSG_RECEIVED = Counter(
    "grpc_server_msg_received_total", "Stream messages received by the server.", _RPC
)
SERVER_MSG_SENT = Counter("grpc_server_msg_sent_total", "Stream messages sent by the server.", _RPC)

CLIENT_STARTED = Counter(
    "grpc_client_started_total", "RPCs started by this process as a client.", _RPC
)
CLIENT_HANDLED = Counter(
    "grpc_client_handled_total", "RPCs completed as a client, by status code.", (*_RPC, "grpc_code")
)
CLIENT_HANDLING_SECONDS = Histogram(
    "grpc_client_handling_seconds",
    "Time for an outgoing RPC to complete.",
    _RPC,
    buckets=_LATENCY_BUCKETS,
)

RATELIMIT_REJECTED = Counter(
    "finsight_ratelimit_rejected_total",
    "Requests rejected by the per-caller rate limit.",
    ("grpc_service", "method_class"),
)
RATELIMIT_REDIS_ERRORS = Counter(
    "finsight_ratelimit_redis_errors_total",
    "Rate-limit checks that could not reach Redis, by the fail mode applied.",
    ("fail_mode",),
)
AUTH_FAILURES = Counter(
    "finsight_auth_failures_total",
    "Rejected authentications, by reason.",
    ("grpc_service", "reason"),
)
REDIS_SCRIPT_BATCH_SIZE = Histogram(
    "finsight_redis_script_batch_size",
    "Lua script calls sent to Redis together in one pipeline (libs.common.ratelimit).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
DEPENDENCY_UP = Gauge(
    "finsight_dependency_up",
    "1 when a dependency answered its last readiness check.",
    ("dependency",),
)
SERVICE_READY = Gauge("finsight_service_ready", "1 while the service reports SERVING.")
DB_QUERY_SECONDS = Histogram(
    "finsight_db_query_seconds",
    "Database statement time (DuckDB or PostgreSQL), by stable statement name.",
    ("db", "statement"),
    buckets=_LATENCY_BUCKETS,
)
DB_MEMORY_BYTES = Gauge(
    "finsight_db_memory_bytes",
    "Memory DuckDB's buffer manager holds (duckdb_memory()), read every readiness round; "
    "bounded by FINSIGHT_DB_MEMORY_LIMIT.",
    ("db",),
)


class _NativeHeap(Collector):
    """`finsight_native_heap_bytes`, read when Prometheus scrapes (on the metrics server's
    thread), not on the event loop: mallinfo2 walks every arena's free lists, ~0.8 ms in a
    gateway process — once a second on the loop, that stall reached requests' p99."""

    name = "finsight_native_heap_bytes"
    documentation = (
        "glibc malloc's heap (mallinfo2), read at each scrape: in_use = allocated now "
        "(DuckDB, gRPC, Python objects over 512 bytes), free = held by malloc but not in use "
        "(fragmentation; only this part could malloc_trim return). Absent without glibc."
    )

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.name, self.documentation, labels=("state",))

    def collect(self) -> Iterator[Metric]:
        usage = heap.read()
        if usage is None:
            return
        family = GaugeMetricFamily(self.name, self.documentation, labels=("state",))
        family.add_metric(("in_use",), usage.in_use)
        family.add_metric(("free",), usage.free)
        yield family


REGISTRY.register(_NativeHeap())
DB_BATCH_SIZE = Histogram(
    "finsight_db_commit_batch_size",
    "Jobs committed together by the group committer.",
    ("db",),
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)


def observe_statement(db: str, statement: str, seconds: float, slow_ms: float) -> None:
    """Time one database statement by its stable name (DuckDB or PostgreSQL alike) and log
    it when it took `slow_ms` or more."""
    DB_QUERY_SECONDS.labels(db, statement).observe(seconds)
    if seconds * 1000 >= slow_ms:
        _db_log.warning(
            "slow statement",
            extra={"db": db, "statement": statement, "duration_ms": round(seconds * 1000, 1)},
        )


def serve_metrics(port: int, host: str = "127.0.0.1") -> int:
    """Expose /metrics on its own port (a daemon thread); return the bound port (0 = any)."""
    httpd, _ = start_http_server(port, addr=host)
    return int(httpd.server_port)
