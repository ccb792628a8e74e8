"""Optional Sentry-compatible error reporting (enabled by `SENTRY_DSN`).

Only unexpected exceptions are reported, once each, by the server
interceptor, tagged with the same opaque error id the client saw, the RPC,
the release and the environment. Nothing personal leaves the process: no
request bodies, no local variables, no log breadcrumbs, no default PII, and
every string in the event passes through the log redactor (API keys, bearer
tokens, provider keys, known secret values).
"""

from __future__ import annotations

from typing import Any

import sentry_sdk

from libs.common.logging import redact

_enabled = False


def configure_error_reporting(
    dsn: str | None,
    *,
    service: str,
    release: str,
    environment: str,
    transport: Any = None,
) -> bool:
    """Initialise the SDK when a DSN is set; return whether reporting is on."""
    global _enabled
    if not dsn:
        return False
    sentry_sdk.init(
        dsn=dsn,
        release=release,
        environment=environment,
        server_name=service,
        default_integrations=False,  # no logging breadcrumbs, no atexit noise
        auto_enabling_integrations=False,
        include_local_variables=False,
        send_default_pii=False,
        max_breadcrumbs=0,
        before_send=_scrub_event,  # type: ignore[arg-type]
        transport=transport,
    )
    sentry_sdk.set_tag("service", service)
    _enabled = True
    return True


def report_exception(exc: BaseException, *, error_id: str, rpc: str, caller: str) -> None:
    """Send one event for an unexpected exception (no-op when reporting is off)."""
    if not _enabled:
        return
    with sentry_sdk.new_scope() as scope:
        scope.set_tag("error_id", error_id)
        scope.set_tag("rpc", rpc)
        scope.set_tag("caller", caller)
        scope.fingerprint = ["{{ default }}", rpc]
        sentry_sdk.capture_exception(exc)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def _scrub_event(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
    event.pop("request", None)
    event.pop("user", None)
    event.pop("breadcrumbs", None)
    for exc in event.get("exception", {}).get("values", []):
        for frame in (exc.get("stacktrace") or {}).get("frames", []):
            frame.pop("vars", None)
    return _scrub(event)  # type: ignore[no-any-return]


def flush() -> None:
    if _enabled:
        sentry_sdk.flush(timeout=2)
