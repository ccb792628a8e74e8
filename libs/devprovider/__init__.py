r"""Local OpenAI/DeepSeek-compatible LLM provider for tests and benchmarks (dev only).

A development tool, not part of any service: production code must never import this
package, and it imports nothing from the services (tests/llm_gateway/test_layering.py checks
both). It exists so that the llm_gateway can be exercised end to end (retries, timeouts,
streaming, cancellation) without a real provider. It is a real HTTP/1.1 server (keep-alive,
pipelining, chunked SSE) built on asyncio protocols only, so it needs no dependency beyond
the standard library (``httpx`` is imported lazily by ``DevProviderControl``).

Running it
    python -m libs.devprovider --port 8089 [--latency-ms 50]
        [--api-key KEY | --no-auth] [--default-action JSON] [--log-limit N]
    python -m libs.devprovider --bench [--latency-ms 50]
        [--bench-requests 20000] [--bench-concurrency 100] [--bench-stream]

    The first stdout line is ``LISTENING http://HOST:PORT`` (``--port 0`` picks a free port).
    ``--bench`` starts a provider in a child process and loads it from this process with a
    raw-socket keep-alive client, then prints the figures as JSON.

From Python
    ``async with DevProvider() as p:`` serves in-process on an ephemeral 127.0.0.1 port
    (``p.base_url`` ends in ``/v1``, ``p.root_url`` does not; ``p.state`` is the live state).
    ``with DevProviderProcess(latency_ms=50) as p:`` (or ``async with``) runs it in a child
    process so it does not share the CPU of the process under test. ``run_load(...)`` is the
    load generator used by ``--bench``.

Provider endpoints (require ``Authorization: Bearer <key>``; default key ``sk-devprovider``)
    POST /v1/chat/completions and /chat/completions (DeepSeek's base URL has no /v1)
        OpenAI chat body: model, messages, max_tokens, temperature, top_p, stop, stream,
        stream_options.include_usage, response_format. Reply content is deterministic:
        ``"echo: " + <last user message>`` (``{"echo": ...}`` JSON for
        ``response_format.type`` ``"json_object"`` or ``"json_schema"``; the schema itself is
        not enforced: script ``content`` for other shapes), cut at the first ``stop`` string and at
        ``max_tokens`` "tokens" (a token here is a whitespace-separated word).
        usage: prompt_tokens = sum over messages of (1 + words in content); completion_tokens
        = words of content + reasoning; total_tokens; prompt_cache_hit_tokens = 0;
        prompt_cache_miss_tokens = prompt_tokens; prompt_tokens_details.cached_tokens;
        completion_tokens_details.reasoning_tokens.
        Streaming: ``text/event-stream`` over chunked encoding: a role chunk, one chunk per
        word, a final chunk with finish_reason, a usage chunk with ``choices: []`` when
        ``stream_options.include_usage``, then ``data: [DONE]``.
    POST /v1/embeddings and /embeddings
        OpenAI embeddings body: model, input (a string or a list of non-empty strings, at
        most 2048), dimensions (1..8192, default 64), encoding_format ("float" only).
        Vectors are deterministic: a hashed bag of words (every lower-cased ``\w+`` token
        adds 1 to bucket ``blake2b(word) mod dimensions``), L2-normalised, so texts sharing
        words are similar (``embeddings.embed_text``). usage: prompt_tokens = total_tokens =
        sum over inputs of max(1, whitespace-separated words). Scripted actions apply as for
        chat completions (status, retry_after, delay_ms, hang, drop, keepalive_lines,
        cut_after_chunks, headers; ``usage`` is merged over the computed usage).
    GET /v1/models (and /models): OpenAI list format.
    Errors use the OpenAI body ``{"error": {"message", "type", "param", "code"}}``; a wrong
    key gives 401 (and consumes no scripted action).

Control API (no auth; JSON in and out)
    POST /_control/script   {"actions": [ACTION, ...], "default": ACTION | null,
                             "replace": false}
        Appends one-shot actions to a FIFO queue: each completion request consumes one. When
        the queue is empty the sticky ``default`` action applies (``null`` clears it; omit
        the key to keep it). ``replace`` empties the queue first. A bare JSON list is taken
        as ``actions``. Unknown keys are rejected with 400 so typos fail loudly.
    POST /_control/reset    clears queue, default action and request log.
    GET  /_control/state    {"queued": [...], "default": ..., "latency_ms": ...}.
    GET  /_control/requests[?since=ID]
        {"requests": [ENTRY, ...]}, oldest first, newest ``--log-limit`` kept. ENTRY: id, ts
        (epoch s), mono (time.monotonic, comparable across local processes), method, path,
        headers (lower-case names), body (parsed JSON or null, raw text in body_raw), action,
        stream, status, outcome (ok | error | dropped | cut | cancelled), cancelled (the
        client went away before the answer was complete), chunks_sent, end_ts, duration_ms.

ACTION keys (combine freely; all optional)
    status: int            answer with this status and an OpenAI error body (any code, e.g.
                           400 401 402 422 429 500 502 503 504); message, error_type,
                           error_code override the body fields.
    retry_after: number | str
                           Retry-After header: a number is seconds; a string is sent verbatim
                           (e.g. an HTTP-date); with retry_after_format "http-date" a number
                           is rendered as the HTTP-date that many seconds from now.
    delay_ms: number       wait before answering (on top of the global --latency-ms).
    hang: true             accept and never answer until the client goes away.
    drop: true             close the TCP connection without any response.
    cut_after_chunks: k    stream k delta chunks, then abort the connection (no final chunk,
                           no [DONE]); non-streaming: send half of the body, then abort.
    chunk_delay_ms: number wait between streamed delta chunks.
    keepalive_lines: n, keepalive_interval_ms: m (default 100)
                           DeepSeek's queueing behaviour: send the 200 headers, then n blank
                           lines (non-stream, body is chunked) or n ``: keep-alive`` SSE
                           comments (stream), one every m ms, then the real answer. A huge n
                           never answers while bytes keep flowing.
    content: str           fixed reply text (still subject to stop/max_tokens).
    reasoning_content: str reasoning text (message.reasoning_content / reasoning deltas).
    finish_reason: str     override the finish reason.
    usage: {...}           merged over the computed usage (totals are recomputed unless given).
    headers: {...}         extra response headers.
    body: JSON value       sent verbatim as the 200 answer instead of the computed one
                           (malformed answers: wrong shapes, missing fields), non-streaming.
    times: n               expand into n identical queue entries.

    Order of events: latency + delay_ms, then hang / drop / status, then (for 200) headers,
    keep-alive lines and the answer. Client disconnects are noticed at every wait and logged as
    ``cancelled: true``.

Modules
    state        scripted actions (``validate_action``) and ``ProviderState``
    wire         HTTP/1.1 request parser and response framing
    completions  the deterministic reply, usage, JSON and SSE encodings
    embeddings   the deterministic vectors, usage and JSON of ``/embeddings``
    server       connections, routing, control API, ``DevProvider``
    clients      ``DevProviderProcess`` (child process) and ``DevProviderControl``
    load         ``run_load``, the load generator
    cli          ``python -m libs.devprovider``
"""

from libs.devprovider.cli import main
from libs.devprovider.clients import READY_PREFIX, DevProviderControl, DevProviderProcess
from libs.devprovider.load import LoadResult, run_load
from libs.devprovider.server import MODEL_IDS, DevProvider
from libs.devprovider.state import DEFAULT_API_KEY, ProviderState, ScriptError, validate_action

__all__ = [
    "DEFAULT_API_KEY",
    "MODEL_IDS",
    "READY_PREFIX",
    "DevProvider",
    "DevProviderControl",
    "DevProviderProcess",
    "LoadResult",
    "ProviderState",
    "ScriptError",
    "main",
    "run_load",
    "validate_action",
]
