"""HTTP/1.1 wire format: an incremental request parser and response framing.

Built on bytes only (no HTTP library), so the server speaks exactly what it is told to:
keep-alive, pipelining, chunked bodies, ``100 Continue``.
"""

from __future__ import annotations

import http
import json
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 32 * 1024 * 1024
LAST_CHUNK = b"0\r\n\r\n"

# (error type, default message, error code) per status, after OpenAI's and DeepSeek's docs.
_ERROR_DEFAULTS: dict[int, tuple[str, str, str | None]] = {
    400: ("invalid_request_error", "Invalid request body", None),
    401: (
        "authentication_error",
        "Authentication Fails, the API key is invalid",
        "invalid_api_key",
    ),
    402: ("insufficient_quota", "Insufficient Balance", "insufficient_balance"),
    404: ("invalid_request_error", "Not found", None),
    405: ("invalid_request_error", "Method not allowed", None),
    413: ("invalid_request_error", "Request body too large", None),
    422: ("invalid_request_error", "Invalid Parameters", None),
    429: ("rate_limit_error", "Rate Limit Reached", "rate_limit_exceeded"),
    500: ("server_error", "Server Error", None),
    502: ("server_error", "Bad Gateway", None),
    503: ("server_error", "Server Overloaded", None),
    504: ("server_error", "Gateway Timeout", None),
}


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]
    body: bytes

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> dict[str, list[str]]:
        return urllib.parse.parse_qs(urllib.parse.urlsplit(self.target).query)

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection


_Head = tuple[str, str, str, dict[str, str]]


class RequestParser:
    """Incremental parser: Content-Length and chunked request bodies, pipelining."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._head: _Head | None = None
        self._continue_sent = False

    def feed(self, data: bytes) -> None:
        self._buf += data

    def take_continue(self) -> bool:
        """True once per request whose client waits for ``100 Continue`` before the body."""
        if self._head is None or self._continue_sent:
            return False
        self._continue_sent = self._head[3].get("expect", "").lower() == "100-continue"
        return self._continue_sent

    def next_request(self) -> Request | None:
        if self._head is None and not self._parse_head():
            return None
        assert self._head is not None
        method, target, version, headers = self._head
        body = self._take_body(headers)
        if body is None:
            return None
        self._head = None
        self._continue_sent = False
        return Request(method, target, version, headers, body)

    def _parse_head(self) -> bool:
        while self._buf.startswith(b"\r\n"):  # RFC 9112: ignore blank lines before a request
            del self._buf[:2]
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEAD_BYTES:
                raise BadRequest(431, "request head too large")
            return False
        lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
        del self._buf[: end + 4]
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise BadRequest(400, f"malformed request line {lines[0]!r}")
        self._head = (parts[0], parts[1], parts[2], parse_headers(lines[1:]))
        return True

    def _take_body(self, headers: Mapping[str, str]) -> bytes | None:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return self._take_chunked()
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise BadRequest(400, "invalid Content-Length") from None
        if length < 0 or length > MAX_BODY_BYTES:
            raise BadRequest(413, "request body too large")
        if len(self._buf) < length:
            return None
        body = bytes(self._buf[:length])
        del self._buf[:length]
        return body

    def _take_chunked(self) -> bytes | None:
        # Decode without consuming until the whole body is buffered: simple and restartable.
        pos, total = 0, 0
        parts: list[bytes] = []
        while True:
            eol = self._buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = _chunk_size(bytes(self._buf[pos:eol]))
            pos = eol + 2
            if size == 0:
                return self._finish_chunked(pos, parts)
            total += size
            if total > MAX_BODY_BYTES:
                raise BadRequest(413, "request body too large")
            if len(self._buf) < pos + size + 2:
                return None
            parts.append(bytes(self._buf[pos : pos + size]))
            pos += size + 2

    def _finish_chunked(self, pos: int, parts: list[bytes]) -> bytes | None:
        while True:  # skip trailer fields up to the empty line
            eol = self._buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            if eol == pos:
                del self._buf[: eol + 2]
                return b"".join(parts)
            pos = eol + 2


def _chunk_size(line: bytes) -> int:
    try:
        return int(line.split(b";", 1)[0].strip(), 16)
    except ValueError:
        raise BadRequest(400, "invalid chunk size") from None


def parse_headers(lines: Sequence[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequest(400, f"malformed header line {line!r}")
        key = name.strip().lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def response_head(
    status: int, headers: Iterable[tuple[str, str]], keep_alive: bool = True
) -> bytes:
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}", "Server: finsight-devprovider"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def frame(data: bytes) -> bytes:
    """One chunk of a ``Transfer-Encoding: chunked`` body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def json_bytes(payload: object) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def full_response(
    status: int,
    payload: object,
    headers: Iterable[tuple[str, str]] = (),
    keep_alive: bool = True,
) -> bytes:
    body = json_bytes(payload)
    all_headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        *headers,
    ]
    return response_head(status, all_headers, keep_alive) + body


def error_payload(
    status: int, message: str | None = None, error_type: str | None = None, code: str | None = None
) -> dict[str, Any]:
    default_type, default_message, default_code = _ERROR_DEFAULTS.get(
        status, ("api_error", f"devprovider scripted error {status}", None)
    )
    return {
        "error": {
            "message": message or default_message,
            "type": error_type or default_type,
            "param": None,
            "code": code or default_code,
        }
    }
