"""An httpx transport over aiohttp's HTTP/1.1 client (C-accelerated parser, O(1) pool).

Why: httpx's default transport (httpcore) costs 2.6-3.9 ms of CPU per request on this
project's 2-core machine against a local provider (encode/httpx#3215: the pool is scanned
under a lock for every request, and the request path is pure Python: h11, anyio, cancel
scopes), more than the gateway's whole CPU budget per request (3 ms). The same requests cost
~0.9 ms through `httpx.AsyncClient(transport=AiohttpTransport(...))`, ~0.5 ms through this
transport alone (what `ProviderClient` does) and ~0.3 ms through aiohttp alone
(docs/llm_gateway.md "Performance").

The gateway keeps talking httpx (`httpx.Request`/`httpx.Response`, httpx's exceptions and
timeouts); only the bytes on the wire go through aiohttp. What the transport guarantees:

* httpx's timeouts are honoured: `connect` → aiohttp `sock_connect`, `pool` + `connect` →
  aiohttp `connect` (waiting for a free connection, then connecting), `read` → `sock_read`
  (idle time between bytes). `write` has no aiohttp equivalent (request bodies are small and
  go to the kernel's socket buffer); the provider client's absolute per-attempt deadline
  bounds everything anyway.
* aiohttp's errors become the httpx exceptions httpcore would raise (ConnectError,
  ConnectTimeout, PoolTimeout, ReadTimeout, ReadError, RemoteProtocolError), so callers
  classify failures exactly as before.
* Bodies are passed through undecoded (`auto_decompress=False`): httpx decodes
  Content-Encoding itself, as it does over httpcore.
* Closing a response whose body was not read to the end closes its connection (the provider
  sees the disconnect: a cancelled stream cancels the provider request); a fully read one
  goes back to the keep-alive pool.
* Proxies: HTTP(S)_PROXY/NO_PROXY are honoured, looked up once per origin (aiohttp's own
  `trust_env=True` re-reads the environment on every request: ~0.6 ms of CPU each here).
  An `httpx.AsyncClient` put in front of this transport must be built with
  `trust_env=False`, or httpx would mount its own httpcore proxy transports before it.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

import aiohttp
import httpx
from aiohttp.helpers import get_env_proxy_for_url
from multidict import CIMultiDict
from yarl import URL

# Headers aiohttp would add on its own: httpx already sets the ones it wants (or not).
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


_Proxy = tuple[URL, aiohttp.BasicAuth | None]


def _env_proxy(url: URL) -> _Proxy | None:
    """(proxy URL, credentials from ~/.netrc) from HTTP(S)_PROXY/NO_PROXY, or None."""
    try:
        return get_env_proxy_for_url(url)
    except LookupError:  # no proxy for this URL (none set, or NO_PROXY matches)
        return None


def env_proxy(url: str) -> str | None:
    """The HTTP(S)_PROXY that applies to `url` (NO_PROXY honoured), or None."""
    proxy = _env_proxy(URL(url))
    return None if proxy is None else str(proxy[0])


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self._response.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    return
                yield chunk
        except aiohttp.ClientPayloadError as exc:  # truncated body, bad chunked framing
            raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__) from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise httpx.ReadTimeout(str(exc) or "read timed out") from exc
        except aiohttp.ServerDisconnectedError as exc:
            raise httpx.RemoteProtocolError(str(exc) or "server disconnected") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc

    async def aclose(self) -> None:
        response = self._response
        if response.content.at_eof():
            response.release()  # body fully read: the connection is reusable
        else:
            response.close()  # unread body: drop the connection (cancels the request)


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One aiohttp session (one bounded keep-alive pool) behind an httpx client."""

    def __init__(
        self,
        *,
        max_connections: int,
        keepalive_expiry_s: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._max_connections = max_connections
        self._keepalive_expiry_s = keepalive_expiry_s
        self._ssl_context = ssl_context
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}
        self._proxies: dict[tuple[str, str, int | None], _Proxy | None] = {}
        # Per-request objects that only depend on per-client constants, built once.
        self._timeouts: dict[tuple[float | None, ...], aiohttp.ClientTimeout] = {}
        self._headers: dict[tuple[tuple[bytes, bytes], ...], CIMultiDict[str]] = {}

    def _get_session(self) -> aiohttp.ClientSession:
        # Created on first use: an aiohttp session belongs to the running event loop.
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                keepalive_timeout=self._keepalive_expiry_s,
                ssl=self._ssl_context if self._ssl_context is not None else True,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),  # providers set no cookies we want
                auto_decompress=False,
                skip_auto_headers=_SKIP_AUTO_HEADERS,
                trust_env=False,  # see _proxy
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    def _url(self, url: httpx.URL) -> URL:
        # A provider has one or two URLs; parsing each once saves yarl's work per request.
        key = str(url)
        parsed = self._urls.get(key)
        if parsed is None:
            parsed = URL(key, encoded=True)
            if len(self._urls) < 64:
                self._urls[key] = parsed
        return parsed

    def _proxy(self, url: URL) -> _Proxy | None:
        """The proxy for this origin from the environment, computed once per origin."""
        origin = (url.scheme, url.host or "", url.port)
        if origin not in self._proxies:
            self._proxies[origin] = _env_proxy(url)
        return self._proxies[origin]

    def _aiohttp_timeout(self, request: httpx.Request) -> aiohttp.ClientTimeout:
        timeouts = request.extensions.get("timeout") or {}
        connect, pool = timeouts.get("connect"), timeouts.get("pool")
        key = (connect, pool, timeouts.get("read"))
        timeout = self._timeouts.get(key)
        if timeout is None:
            timeout = aiohttp.ClientTimeout(
                total=None,
                connect=None if pool is None or connect is None else pool + connect,
                sock_connect=connect,
                sock_read=timeouts.get("read"),
            )
            if len(self._timeouts) < 64:
                self._timeouts[key] = timeout
        return timeout

    def _aiohttp_headers(self, request: httpx.Request) -> CIMultiDict[str]:
        # Content-Length is aiohttp's to set (from the body); the rest is usually the same
        # few header sets of the client, converted once (aiohttp copies what it is given).
        raw = tuple(kv for kv in request.headers.raw if kv[0].lower() != b"content-length")
        headers = self._headers.get(raw)
        if headers is None:
            headers = CIMultiDict((k.decode("latin-1"), v.decode("latin-1")) for k, v in raw)
            if len(self._headers) < 64:
                self._headers[raw] = headers
        return headers

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        url = self._url(request.url)
        proxy = self._proxy(url)
        try:
            response = await self._get_session().request(
                request.method,
                url,
                proxy=proxy[0] if proxy else None,
                proxy_auth=proxy[1] if proxy else None,
                headers=self._aiohttp_headers(request),
                data=body or None,
                allow_redirects=False,
                timeout=self._aiohttp_timeout(request),
            )
        except aiohttp.ConnectionTimeoutError as exc:
            # aiohttp raises this both while waiting for a pooled connection and while
            # connecting; a provider that cannot be reached in time is a connect failure.
            raise httpx.ConnectTimeout(str(exc) or "connect timed out") from exc
        except aiohttp.SocketTimeoutError as exc:  # no response head within `read`
            raise httpx.ReadTimeout(str(exc) or "read timed out") from exc
        except TimeoutError as exc:
            raise httpx.PoolTimeout(str(exc) or "timed out waiting for a connection") from exc
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        except aiohttp.ServerDisconnectedError as exc:
            raise httpx.RemoteProtocolError(str(exc) or "server disconnected") from exc
        except aiohttp.ClientResponseError as exc:  # unparsable response head
            raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__) from exc
        except (aiohttp.ClientOSError, aiohttp.ServerConnectionError) as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
        except aiohttp.ClientError as exc:
            raise httpx.TransportError(str(exc) or type(exc).__name__) from exc
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            stream=_ResponseStream(response),
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": (response.reason or "").encode("latin-1", "replace"),
            },
            request=request,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
