"""An OTLP/gRPC trace receiver in the test process: what an OpenTelemetry Collector sees.

`OtlpReceiver` serves `opentelemetry.proto.collector.trace.v1.TraceService/Export` on an
ephemeral 127.0.0.1 port (threads of its own, so it answers whatever event loop the test
and any in-process service run on). Services point `OTEL_EXPORTER_OTLP_ENDPOINT` at
`receiver.endpoint`; every span they export is kept, flattened with its resource, as a
`ReceivedSpan`. Tests never sleep for the export: `await receiver.wait_for(predicate)`
returns as soon as the spans received satisfy it (woken by each Export), or fails after
its timeout with what did arrive.

    with OtlpReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}
        ...
        spans = await receiver.wait_for(lambda got: any(s.name == "llm.cache.get" for s in got))
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

Attributes = dict[str, Any]

# OTLP's Span.SpanKind numbers, by the names an operator reads in a trace viewer.
KINDS = {
    trace_pb2.Span.SPAN_KIND_INTERNAL: "INTERNAL",
    trace_pb2.Span.SPAN_KIND_SERVER: "SERVER",
    trace_pb2.Span.SPAN_KIND_CLIENT: "CLIENT",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "PRODUCER",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "CONSUMER",
}


def value_of(v: common_pb2.AnyValue) -> Any:
    """An OTLP AnyValue as the Python value the service set (arrays as tuples)."""
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return tuple(value_of(x) for x in v.array_value.values)
    if kind == "kvlist_value":
        return attributes_of(v.kvlist_value.values)
    return getattr(v, kind) if kind else None


def attributes_of(pairs: Iterable[common_pb2.KeyValue]) -> Attributes:
    return {kv.key: value_of(kv.value) for kv in pairs}


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span with its resource, as a trace viewer shows it."""

    resource: Attributes
    scope: str
    name: str
    kind: str  # INTERNAL | SERVER | CLIENT | PRODUCER | CONSUMER
    trace_id: str  # hex
    span_id: str
    parent_span_id: str  # "" for a root span
    attributes: Attributes
    status_code: int  # trace_pb2.Status.StatusCode: 0 unset, 1 ok, 2 error
    start_ns: int
    end_ns: int
    events: tuple[str, ...] = field(default=())

    @property
    def service(self) -> str:
        return str(self.resource.get("service.name", ""))

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def flatten(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    out: list[ReceivedSpan] = []
    for rs in request.resource_spans:
        resource = attributes_of(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    ReceivedSpan(
                        resource=resource,
                        scope=ss.scope.name,
                        name=s.name,
                        kind=KINDS.get(s.kind, "UNSPECIFIED"),
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        attributes=attributes_of(s.attributes),
                        status_code=s.status.code,
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        events=tuple(e.name for e in s.events),
                    )
                )
    return out


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.receiver._add(flatten(request))
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """See the module docstring. Start with `with` (or `start()` / `stop()`)."""

    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._changed = threading.Condition()
        self._server: grpc.Server | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        """What OTEL_EXPORTER_OTLP_ENDPOINT takes (the services export insecure gRPC)."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        server = grpc.server(ThreadPoolExecutor(max_workers=4, thread_name_prefix="otlp"))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=1).wait()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _add(self, spans: list[ReceivedSpan]) -> None:
        with self._changed:
            self._spans.extend(spans)
            self._changed.notify_all()

    # -- reading ---------------------------------------------------------------------------
    def spans(self) -> list[ReceivedSpan]:
        with self._changed:
            return list(self._spans)

    def clear(self) -> None:
        with self._changed:
            self._spans.clear()

    def wait_for_sync(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 15.0
    ) -> list[ReceivedSpan]:
        """Block until `predicate(spans received so far)` holds; return those spans."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(list(self._spans)):
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted({f"{s.service}:{s.name}" for s in self._spans})
                    raise AssertionError(
                        f"spans expected within {timeout}s never arrived; received: {names}"
                    )
                self._changed.wait(left)
            return list(self._spans)

    async def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 15.0
    ) -> list[ReceivedSpan]:
        """`wait_for_sync` off the event loop (in-process services keep running)."""
        return await asyncio.to_thread(self.wait_for_sync, predicate, timeout)


# -- reading a trace as an operator does ------------------------------------------------------
def trace_of(spans: Iterable[ReceivedSpan], trace_id: str) -> list[ReceivedSpan]:
    return sorted((s for s in spans if s.trace_id == trace_id), key=lambda s: s.start_ns)


def children_of(spans: Iterable[ReceivedSpan], parent: ReceivedSpan) -> list[ReceivedSpan]:
    return sorted(
        (s for s in spans if s.parent_span_id == parent.span_id and s.trace_id == parent.trace_id),
        key=lambda s: s.start_ns,
    )


def descendants_of(spans: Iterable[ReceivedSpan], root: ReceivedSpan) -> list[ReceivedSpan]:
    """Every span under `root` in its trace (any depth), oldest first."""
    in_trace = [s for s in spans if s.trace_id == root.trace_id]
    below: set[str] = {root.span_id}
    grew = True
    while grew:
        grew = False
        for s in in_trace:
            if s.parent_span_id in below and s.span_id not in below:
                below.add(s.span_id)
                grew = True
    return sorted(
        (s for s in in_trace if s.span_id in below - {root.span_id}), key=lambda s: s.start_ns
    )


def render(spans: Iterable[ReceivedSpan], root: ReceivedSpan) -> str:
    """The tree under `root`, one span a line (for assertion messages)."""
    spans = list(spans)
    lines: list[str] = []

    def walk(span: ReceivedSpan, depth: int) -> None:
        lines.append(
            f"{'  ' * depth}{span.service} {span.kind} {span.name} {span.duration_ms:.2f}ms"
        )
        for child in children_of(spans, span):
            walk(child, depth + 1)

    walk(root, 0)
    return "\n".join(lines)
