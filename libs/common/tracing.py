"""OpenTelemetry tracing: one provider per process, OTLP/gRPC export when configured.

W3C trace context travels in gRPC metadata (`traceparent`), injected and
extracted by the opentelemetry-instrumentation-grpc interceptors that
`libs.common.server` and `libs.common.clients` install.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

_provider: TracerProvider | None = None


def configure_tracing(
    service: str,
    *,
    otlp_endpoint: str | None,
    sample_ratio: float = 1.0,
    release: str = "dev",
    environment: str = "dev",
    extra_processors: tuple[SpanProcessor, ...] = (),
) -> TracerProvider:
    """Install the global tracer provider once; later calls add processors only."""
    global _provider
    if _provider is None:
        resource = Resource.create(
            {
                "service.name": f"finsight-{service}",
                "service.version": release,
                "deployment.environment": environment,
            }
        )
        _provider = TracerProvider(
            resource=resource, sampler=ParentBased(TraceIdRatioBased(sample_ratio))
        )
        if otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            _provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True))
            )
        trace.set_tracer_provider(_provider)
    for processor in extra_processors:
        _provider.add_span_processor(processor)
    return _provider


def shutdown_tracing() -> None:
    if _provider is not None:
        _provider.force_flush(timeout_millis=2000)


def current_trace_id() -> str:
    """Hex trace id of the active span, or "" outside a trace."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)
