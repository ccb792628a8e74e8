"""The one server interceptor chain every service uses.

Order (outermost first): OpenTelemetry tracing (W3C context from metadata,
installed by `libs.common.server` from opentelemetry-instrumentation-grpc),
then `FinsightServerInterceptor`, which for every RPC does

    metrics started → bind deadline → authenticate → scope check → rate limit
    → handler → exception → status mapping → metrics handled → access log line.

It is the only place where exceptions become gRPC status codes: a
`FinsightError` is sent with its `google.rpc` details; anything else becomes
INTERNAL with an opaque error id, which is also in the log line (with the
stack trace, which never reaches the client).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_status import rpc_status

from libs.common import context, metrics
from libs.common.auth import (
    ANONYMOUS,
    Identity,
    KeyStore,
    bearer_from_metadata,
    on_behalf_of,
    require_scope,
)
from libs.common.error_reporting import report_exception
from libs.common.errors import FinsightError, Internal, Unauthenticated
from libs.common.ratelimit import CallerLimit, TokenBucket
from libs.common.wire import Undecodable, message_class, tolerant

access_log = logging.getLogger("finsight.access")
log = logging.getLogger(__name__)

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class MethodPolicy:
    """What a method needs: a scope to call it, and the rate-limit class it spends from."""

    scope: str | None
    method_class: str = "default"
    # The handler spends the caller's rate limit in a Redis script of its own, before any
    # side effect (libs.common.ratelimit.CallerLimit; the gateway's tenant admission):
    # one round trip fewer per call. Spent here if the handler did not.
    limit_in_handler: bool = False


@dataclass(frozen=True)
class RateLimit:
    rate: float
    burst: float


class _MethodMetrics:
    """A method's metric children, resolved once: `.labels()` costs a lock and a dict
    lookup per call, and go-grpc-prometheus labels are fixed per method."""

    __slots__ = ("handled", "handling", "labels", "received", "sent", "started")

    def __init__(self, service: str, method: str, kind: str) -> None:
        self.labels = (service, method, kind)
        self.started = metrics.SERVER_STARTED.labels(*self.labels)
        self.handling = metrics.SERVER_HANDLING_SECONDS.labels(*self.labels)
        self.received = metrics.SERVER_MSG_RECEIVED.labels(*self.labels)
        self.sent = metrics.SERVER_MSG_SENT.labels(*self.labels)
        self.handled: dict[grpc.StatusCode, Any] = {}

    def handled_child(self, code: grpc.StatusCode) -> Any:
        child = self.handled.get(code)
        if child is None:
            child = self.handled[code] = metrics.SERVER_HANDLED.labels(*self.labels, code.name)
        return child


@dataclass
class _Rpc:
    service: str
    method: str
    type: str
    started: float
    metrics: _MethodMetrics
    identity: Identity = ANONYMOUS
    code: grpc.StatusCode = grpc.StatusCode.OK
    error_id: str | None = None
    reason: str | None = None
    caller_limit: CallerLimit | None = None  # set when the handler spends it
    # Read while the call is alive: ctx.peer() after a client cancelled a server stream
    # touches the freed C-core call and can crash the process (seen with grpcio 1.85).
    peer: str = ""

    @property
    def labels(self) -> tuple[str, str, str]:
        return (self.service, self.method, self.type)


def _rpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    return "server_stream" if handler.response_streaming else "unary"


class FinsightServerInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        *,
        keystore: KeyStore | None,
        limiter: TokenBucket | None,
        policies: Mapping[str, MethodPolicy],
        default_scope: str | None,
        rate_limits: Mapping[str, RateLimit],
        exempt_health: bool = True,
    ) -> None:
        self.keystore = keystore
        self.limiter = limiter
        self.policies = dict(policies)
        self.default_scope = default_scope
        self.rate_limits = dict(rate_limits)
        self.exempt_health = exempt_health
        # The wrapped handler per method, reused while the server hands out the same handler
        # under the same policy: wrapping per RPC (closures, a tolerant deserializer, metric
        # label lookups) cost ~40 µs of CPU per call.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, MethodPolicy, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        full = handler_call_details.method
        service, _, method = full.lstrip("/").rpartition("/")
        policy = self.policies.get(method) or MethodPolicy(self.default_scope)
        cached = self._wrapped.get(full)
        if cached is not None and cached[0] is handler and cached[1] == policy:
            return cached[2]  # type: ignore[no-any-return]
        kind = _rpc_type(handler)
        exempt = full.startswith(EXEMPT_PREFIXES)
        if handler.response_streaming:
            name = "stream_stream" if handler.request_streaming else "unary_stream"
            behavior = getattr(handler, name)
            wrapped: Any = self._wrap_stream(behavior, service, method, kind, policy, exempt)
        else:
            name = "stream_unary" if handler.request_streaming else "unary_unary"
            behavior = getattr(handler, name)
            wrapped = self._wrap_unary(behavior, service, method, kind, policy, exempt)
        replace: dict[str, Any] = {name: wrapped}
        request_class = message_class(handler.request_deserializer)
        if request_class is not None:  # unparsable requests become INVALID_ARGUMENT
            replace["request_deserializer"] = tolerant(request_class)
        wrapped_handler = handler._replace(**replace)  # type: ignore[attr-defined]
        if len(self._wrapped) < 4096:  # bounded: names come from the server's own table
            self._wrapped[full] = (handler, policy, wrapped_handler)
        return wrapped_handler  # type: ignore[no-any-return]

    # -- admission: auth, scope, rate limit ------------------------------------------------
    async def _admit(
        self, rpc: _Rpc, ctx: grpc.aio.ServicerContext, policy: MethodPolicy, exempt: bool
    ) -> None:
        rpc.peer = ctx.peer()
        metadata = ctx.invocation_metadata()
        bearer = bearer_from_metadata(metadata)
        identity = ANONYMOUS
        if self.keystore is not None and not (exempt and self.exempt_health):
            try:
                identity = self.keystore.authenticate(bearer)
            except Unauthenticated as exc:
                metrics.AUTH_FAILURES.labels(rpc.service, exc.reason).inc()
                raise
            if not exempt:
                require_scope(identity, policy.scope)
        rpc.identity = identity
        if not exempt:  # x-finsight-on-behalf-of-tenant (delegation: libs/common/auth.py)
            identity = rpc.identity = on_behalf_of(
                identity, metadata, trusted=self.keystore is None
            )
        context.bind(identity, ctx.time_remaining(), bearer)
        if self.limiter is not None and not exempt:
            limit = self.rate_limits.get(policy.method_class) or self.rate_limits["default"]
            caller = CallerLimit(
                # `{tenant}`: the hash tag the gateway's tenant keys share (one Cluster slot)
                key=f"rl:{identity.tenant}:{identity.caller}:{rpc.service}:{policy.method_class}",
                rate=limit.rate,
                burst=limit.burst,
                subject=f"caller:{identity.caller}",
                what=f"{policy.method_class} requests on {rpc.service}",
                service=rpc.service,
                method_class=policy.method_class,
            )
            if policy.limit_in_handler:
                rpc.caller_limit = caller
                context.defer_caller_limit(caller)
            else:
                await self.limiter.spend(caller)

    async def _spend_deferred(self, rpc: _Rpc, exc: BaseException | None) -> BaseException | None:
        """The caller's token when the handler did not spend it: after an error (the
        caller's refusal replaces it: a throttled caller hears that first, as when the
        interceptor spends it up front), or after an answer given without admission."""
        limit = rpc.caller_limit
        if limit is None or limit.spent or self.limiter is None:
            return exc
        if isinstance(exc, asyncio.CancelledError):
            return exc
        try:
            await self.limiter.spend(limit)
        except FinsightError as refused:
            return refused if exc is not None else None  # an answer given stays given
        return exc

    # -- wrappers ----------------------------------------------------------------------------
    def _wrap_unary(
        self,
        behavior: Callable[..., Any],
        service: str,
        method: str,
        kind: str,
        policy: MethodPolicy,
        exempt: bool,
    ) -> Callable[..., Any]:
        method_metrics = _MethodMetrics(service, method, kind)

        async def handle(request: Any, ctx: grpc.aio.ServicerContext) -> Any:
            rpc = self._begin(service, method, kind, method_metrics)
            try:
                await self._admit(rpc, ctx, policy, exempt)
                if kind == "client_stream":
                    request = _count_received(request, rpc)
                elif isinstance(request, Undecodable):
                    raise request.error()
                reply = await behavior(request, ctx)
                if rpc.caller_limit is not None:
                    await self._spend_deferred(rpc, None)
                return reply
            except BaseException as exc:
                await self._fail(rpc, ctx, await self._spend_deferred(rpc, exc) or exc)
                raise  # unreachable for mapped errors: _fail aborts
            finally:
                self._finish(rpc, ctx)

        return handle

    def _wrap_stream(
        self,
        behavior: Callable[..., Any],
        service: str,
        method: str,
        kind: str,
        policy: MethodPolicy,
        exempt: bool,
    ) -> Callable[..., Any]:
        method_metrics = _MethodMetrics(service, method, kind)

        async def handle(request: Any, ctx: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            rpc = self._begin(service, method, kind, method_metrics)
            try:
                await self._admit(rpc, ctx, policy, exempt)
                if kind == "bidi_stream":
                    request = _count_received(request, rpc)
                elif isinstance(request, Undecodable):
                    raise request.error()
                result = behavior(request, ctx)
                if inspect.isasyncgen(result):
                    sent = method_metrics.sent
                    async for item in result:
                        sent.inc()
                        yield item
                else:  # a handler that writes with ctx.write() and returns None
                    await result
                if rpc.caller_limit is not None:
                    await self._spend_deferred(rpc, None)
            except BaseException as exc:
                await self._fail(rpc, ctx, await self._spend_deferred(rpc, exc) or exc)
                raise
            finally:
                self._finish(rpc, ctx)

        return handle

    def _begin(self, service: str, method: str, kind: str, mm: _MethodMetrics) -> _Rpc:
        rpc = _Rpc(service, method, kind, time.perf_counter(), mm)
        mm.started.inc()
        return rpc

    async def _fail(self, rpc: _Rpc, ctx: grpc.aio.ServicerContext, exc: BaseException) -> None:
        if isinstance(exc, asyncio.CancelledError):
            rpc.code = grpc.StatusCode.CANCELLED
            return
        if isinstance(exc, grpc.aio.AbortError):  # the handler aborted itself
            rpc.code = ctx.code() or grpc.StatusCode.UNKNOWN
            return
        if isinstance(exc, FinsightError):
            error: FinsightError = exc
        else:
            error = Internal()
            report_exception(
                exc,
                error_id=error.metadata["error_id"],
                rpc=f"{rpc.service}/{rpc.method}",
                caller=rpc.identity.caller,
            )
            log.error(
                "unhandled exception in %s/%s",
                rpc.service,
                rpc.method,
                exc_info=exc,
                extra={"error_id": error.metadata["error_id"]},
            )
        rpc.code, rpc.reason = error.code, error.reason
        rpc.error_id = error.metadata.get("error_id")
        await ctx.abort_with_status(rpc_status.to_status(error.to_status()))

    def _finish(self, rpc: _Rpc, ctx: grpc.aio.ServicerContext) -> None:
        elapsed = time.perf_counter() - rpc.started
        if rpc.code == grpc.StatusCode.OK:
            rpc.code = ctx.code() or grpc.StatusCode.OK
        code_name = rpc.code.name
        rpc.metrics.handled_child(rpc.code).inc()
        rpc.metrics.handling.observe(elapsed)
        extra: dict[str, Any] = {
            "grpc_service": rpc.service,
            "grpc_method": rpc.method,
            "grpc_code": code_name,
            "duration_ms": round(elapsed * 1000, 3),
            "caller": rpc.identity.caller,
            "tenant": rpc.identity.tenant,
            "peer": rpc.peer,
        }
        if rpc.identity.delegated:  # acting for `tenant`: the key's own tenant and id
            extra["key_tenant"] = rpc.identity.key_tenant
            extra["key_id"] = rpc.identity.key_id
        if rpc.reason and rpc.code != grpc.StatusCode.OK:
            extra["reason"] = rpc.reason
        if rpc.error_id:
            extra["error_id"] = rpc.error_id
        if rpc.code in _SERVER_FAULTS:
            level = logging.ERROR
        elif rpc.service == "grpc.health.v1.Health" and rpc.code == grpc.StatusCode.OK:
            level = logging.DEBUG  # kubelet probes: not worth a line each
        else:
            level = logging.INFO
        access_log.log(level, "rpc %s/%s %s", rpc.service, rpc.method, code_name, extra=extra)


_SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}


async def _count_received(requests: AsyncIterator[Any], rpc: _Rpc) -> AsyncIterator[Any]:
    received = rpc.metrics.received
    async for item in requests:
        received.inc()
        if isinstance(item, Undecodable):
            raise item.error()
        yield item
