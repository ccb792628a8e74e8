"""The exception hierarchy every service raises, and its mapping to gRPC status.

Domain and servicer code raise these; exactly one interceptor
(`libs.common.interceptors`) turns them into a gRPC status with `google.rpc`
details. Nothing here imports grpc at module import time except the mapping
function, so storage and domain code can raise them freely.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

ERROR_DOMAIN = "finsight.dev"

# A status travels in trailing metadata, which clients refuse past 16 KiB (and refuse at random
# past 8 KiB, gRPC's default soft limit): an error listing every violation of a huge request would reach the caller as
# RESOURCE_EXHAUSTED "received metadata size exceeds limit" instead. So what is sent is
# bounded: the message, each violation's field and description, and the violations in all
# (the rest are summarised by one last violation). `InvalidArgument.violations` keeps all.
MAX_MESSAGE_WIRE_BYTES = 768  # grpc-message is percent-encoded: non-ASCII bytes count 3
MAX_VIOLATION_TEXT_CHARS = 256
MAX_VIOLATIONS_BYTES = 5600  # serialized BadRequest (100 typical violations fit)

# google.protobuf.Timestamp's documented range, 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z.
# Outside it, seconds * 10**6 no longer fits the int64 microseconds our stores keep.
TIMESTAMP_MIN_SECONDS = -62_135_596_800
TIMESTAMP_MAX_SECONDS = 253_402_300_799


@dataclass(frozen=True)
class FieldViolation:
    """One bad field: a dotted path (`messages[2].content`) and why it is bad."""

    field: str
    description: str


@dataclass(frozen=True)
class QuotaViolation:
    """One exhausted quota: whose (`tenant:acme`) and which (`daily_cost_budget`)."""

    subject: str
    description: str


class FinsightError(Exception):
    """Base of every error a client may see. `message` is safe to show to the caller."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    default_reason = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})
        self.retry_after = retry_after

    def details(self) -> list[any_pb2.Any]:
        """`google.rpc` detail messages carried by this error."""
        out = [
            _pack(
                error_details_pb2.ErrorInfo(
                    reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
                )
            )
        ]
        if self.retry_after is not None:
            out.append(_pack(error_details_pb2.RetryInfo(retry_delay=_duration(self.retry_after))))
        return out

    def to_status(self) -> status_pb2.Status:
        return status_pb2.Status(
            code=self.code.value[0],
            message=_clip_wire(self.message, MAX_MESSAGE_WIRE_BYTES),
            details=self.details(),
        )


class InvalidArgument(FinsightError):
    """The request is malformed; `violations` names each bad field."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str | None = None,
        violations: Sequence[FieldViolation] = (),
        **kwargs: object,
    ) -> None:
        self.violations = list(violations)
        if message is None:
            message = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(message or "invalid argument", **kwargs)  # type: ignore[arg-type]

    @classmethod
    def field(cls, field_path: str, description: str) -> InvalidArgument:
        return cls(violations=[FieldViolation(field_path, description)])

    def details(self) -> list[any_pb2.Any]:
        return [*super().details(), _pack(_bounded_bad_request(self.violations))]


class Violations:
    """Collects field violations so a handler can report all of them at once."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field_path: str, description: str) -> None:
        self.items.append(FieldViolation(field_path, description))

    def check(self, ok: bool, field_path: str, description: str) -> bool:
        if not ok:
            self.add(field_path, description)
        return ok

    def timestamp_us(self, field_path: str, ts: timestamp_pb2.Timestamp) -> int | None:
        """`ts` in microseconds since the epoch; None, with a violation, when it lies outside
        the range google.protobuf.Timestamp defines (years 1 to 9999) or its nanos are invalid."""
        ok = TIMESTAMP_MIN_SECONDS <= ts.seconds <= TIMESTAMP_MAX_SECONDS
        if not self.check(
            ok and 0 <= ts.nanos <= 999_999_999,
            field_path,
            "must be a valid timestamp between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z",
        ):
            return None
        return ts.seconds * 1_000_000 + ts.nanos // 1000

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(violations=self.items)

    def __bool__(self) -> bool:
        return bool(self.items)


class NotFound(FinsightError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(FinsightError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(FinsightError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Unauthenticated(FinsightError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(FinsightError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unavailable(FinsightError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class DeadlineExceeded(FinsightError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class ResourceExhausted(FinsightError):
    """Over a rate limit, quota or budget. Carries QuotaFailure when `quota` is set."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        quota: Iterable[QuotaViolation] = (),
        **kwargs: object,
    ) -> None:
        self.quota = list(quota)
        super().__init__(message, **kwargs)  # type: ignore[arg-type]

    def details(self) -> list[any_pb2.Any]:
        out = super().details()
        if self.quota:
            out.append(
                _pack(
                    error_details_pb2.QuotaFailure(
                        violations=[
                            error_details_pb2.QuotaFailure.Violation(
                                subject=q.subject, description=q.description
                            )
                            for q in self.quota
                        ]
                    )
                )
            )
        return out


class Internal(FinsightError):
    """An unexpected failure. The message shown to clients is opaque; the log has the rest."""

    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"

    def __init__(self, error_id: str | None = None) -> None:
        self.error_id = error_id or new_error_id()
        super().__init__(
            f"internal error (error id {self.error_id})",
            metadata={"error_id": self.error_id},
        )


@dataclass
class StatusInfo:
    """What a client can read back from a rich status (used by tests and the CLI)."""

    code: grpc.StatusCode
    message: str
    reason: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    field_violations: list[FieldViolation] = field(default_factory=list)
    retry_after: float | None = None
    quota: list[QuotaViolation] = field(default_factory=list)


def status_info(error: grpc.aio.AioRpcError | grpc.RpcError) -> StatusInfo:
    """Decode the `google.rpc` details of a failed call."""
    from grpc_status import rpc_status

    code = error.code()  # type: ignore[attr-defined]
    info = StatusInfo(code=code, message=error.details() or "")  # type: ignore[attr-defined]
    status = (
        rpc_status.from_call(error)
        if not isinstance(error, grpc.aio.AioRpcError)
        else (_status_from_aio(error))
    )
    if status is None:
        return info
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            ei = error_details_pb2.ErrorInfo()
            detail.Unpack(ei)
            info.reason, info.metadata = ei.reason, dict(ei.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            info.field_violations = [
                FieldViolation(v.field, v.description) for v in br.field_violations
            ]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            ri = error_details_pb2.RetryInfo()
            detail.Unpack(ri)
            info.retry_after = ri.retry_delay.seconds + ri.retry_delay.nanos / 1e9
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            qf = error_details_pb2.QuotaFailure()
            detail.Unpack(qf)
            info.quota = [QuotaViolation(v.subject, v.description) for v in qf.violations]
    return info


def _status_from_aio(error: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status()
            status.ParseFromString(value)
            return status
    return None


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _clip_wire(text: str, limit: int) -> str:
    """`text` cut so that its percent-encoded UTF-8 (as grpc-message is sent) fits `limit`."""
    size = 0
    for i, ch in enumerate(text):
        size += 1 if " " <= ch <= "~" and ch != "%" else 3 * len(ch.encode("utf-8", "replace"))
        if size > limit - 3:  # room for the ellipsis' own encoding
            return text[:i] + "…"
    return text


def _bounded_bad_request(violations: Sequence[FieldViolation]) -> error_details_pb2.BadRequest:
    """The violations that fit MAX_VIOLATIONS_BYTES, in order, then a count of the rest."""
    out = error_details_pb2.BadRequest()
    for i, v in enumerate(violations):
        out.field_violations.add(
            field=_clip(v.field, MAX_VIOLATION_TEXT_CHARS),
            description=_clip(v.description, MAX_VIOLATION_TEXT_CHARS),
        )
        if out.ByteSize() > MAX_VIOLATIONS_BYTES - 64:  # room for the summary
            del out.field_violations[-1]
            out.field_violations.add(
                field="(request)",
                description=f"{len(violations) - i} more violations not listed",
            )
            break
    return out


def new_error_id() -> str:
    return uuid.uuid4().hex[:16]


def grpc_code_number(code: grpc.StatusCode) -> int:
    return int(code.value[0])


def _pack(message: object) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(message)  # type: ignore[arg-type]
    return out


def _duration(seconds: float) -> duration_pb2.Duration:
    seconds = max(0.0, seconds)
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=round((seconds - whole) * 1e9))


assert grpc.StatusCode.INVALID_ARGUMENT.value[0] == code_pb2.INVALID_ARGUMENT
