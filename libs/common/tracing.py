"""OpenTelemetry tracing: one provider per process, OTLP/gRPC export when configured.

W3C trace context travels in gRPC metadata (`traceparent`), injected and
extracted by the opentelemetry-instrumentation-grpc interceptors that
`libs.common.server` and `libs.common.clients` install.

The resource uses the current semantic-convention names: `service.name` is the
Kubernetes name (`llm-gateway`, `memory`, `analytics`), `service.namespace` is
"finsight", `deployment.environment.name` the FINSIGHT_ENV. Kubernetes attributes
(`k8s.pod.name`, `k8s.namespace.name`, `k8s.node.name`, `service.instance.id`) come from
the standard OTEL_RESOURCE_ATTRIBUTES, which the manifests fill from the downward API;
without it `service.instance.id` is a random UUID per process.
"""

from __future__ import annotations

import uuid

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

_provider: TracerProvider | None = None
SERVICE_NAMESPACE = "finsight"


def otel_service_name(service: str) -> str:
    """The OpenTelemetry `service.name` of a service: its Kubernetes name."""
    return service.replace("_", "-")


def build_resource(service: str, *, release: str = "dev", environment: str = "dev") -> Resource:
    """The process's resource: our attributes over OTEL_RESOURCE_ATTRIBUTES, which in
    turn may set `service.instance.id` (and the k8s.* attributes)."""
    fallback = Resource({"service.instance.id": str(uuid.uuid4())})
    return fallback.merge(
        Resource.create(
            {
                "service.name": otel_service_name(service),
                "service.namespace": SERVICE_NAMESPACE,
                "service.version": release,
                "deployment.environment.name": environment,
            }
        )
    )


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
        resource = build_resource(service, release=release, environment=environment)
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
