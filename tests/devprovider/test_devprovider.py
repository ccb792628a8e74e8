"""Tests for the dev LLM provider: a real HTTP server driven with httpx and raw sockets."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from libs.devprovider import (
    DEFAULT_API_KEY,
    DevProvider,
    DevProviderControl,
    DevProviderProcess,
    ScriptError,
    run_load,
    validate_action,
)

AUTH = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}


def chat(text: str = "hello there world", **extra: Any) -> dict[str, Any]:
    return {
        "model": "deepseek-chat",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": text},
        ],
        **extra,
    }


def data_events(lines: list[str]) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


def stream_content(events: list[str]) -> str:
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


@pytest.fixture(scope="module")
async def provider() -> AsyncIterator[DevProvider]:
    async with DevProvider() as running:
        yield running


@pytest.fixture(autouse=True)
def fresh_state(provider: DevProvider) -> None:
    provider.state.reset()


# Module-scoped clients: building an httpx client costs ~50 ms (TLS context) per instance.
@pytest.fixture(scope="module")
async def client(provider: DevProvider) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=provider.base_url, headers=AUTH, timeout=5) as c:
        yield c


@pytest.fixture(scope="module")
async def control(provider: DevProvider) -> AsyncIterator[DevProviderControl]:
    async with DevProviderControl(provider.base_url) as c:
        yield c


async def wait_for_entry(
    control: DevProviderControl, predicate: Callable[[dict[str, Any]], bool], timeout: float = 3
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in await control.requests():
            if predicate(entry):
                return entry
        await asyncio.sleep(0.02)
    raise AssertionError(f"no matching request-log entry: {await control.requests()}")


# -- normal behaviour ------------------------------------------------------------------


async def test_completion_echoes_last_user_message(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat/completions", json=chat("hello there world"))
    assert response.status_code == 200
    payload = response.json()
    assert payload["object"] == "chat.completion"
    choice = payload["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "echo: hello there world"}
    assert choice["finish_reason"] == "stop"
    # prompt: (1 + 3 words) + (1 + 3 words); completion: 4 words
    assert payload["usage"] == {
        "prompt_tokens": 8,
        "completion_tokens": 4,
        "total_tokens": 12,
        "prompt_cache_hit_tokens": 0,
        "prompt_cache_miss_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


async def test_deepseek_base_url_without_v1(provider: DevProvider) -> None:
    async with httpx.AsyncClient(base_url=provider.root_url, headers=AUTH) as deepseek_style:
        response = await deepseek_style.post("/chat/completions", json=chat("hi"))
    assert response.json()["choices"][0]["message"]["content"] == "echo: hi"


async def test_max_tokens_truncates_with_length_reason(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat/completions", json=chat("a b c d e", max_tokens=3))
    choice = response.json()["choices"][0]
    assert choice["message"]["content"] == "echo: a b"
    assert choice["finish_reason"] == "length"
    assert response.json()["usage"]["completion_tokens"] == 3


async def test_stop_sequence_cuts_reply(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat/completions", json=chat("alpha STOP beta", stop=["STOP"]))
    assert response.json()["choices"][0]["message"]["content"] == "echo: alpha "


async def test_json_object_response_format(client: httpx.AsyncClient) -> None:
    body = chat("prices?", response_format={"type": "json_object"})
    content = (await client.post("/chat/completions", json=body)).json()["choices"][0]
    assert json.loads(content["message"]["content"]) == {"echo": "prices?"}


async def test_json_answers_follow_the_schema_they_are_given(client: httpx.AsyncClient) -> None:
    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "string"},
            "score": {"type": "integer", "minimum": 3},
            "kind": {"enum": ["a", "b"]},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        },
        "required": ["answer", "score", "kind", "tags"],
    }
    want = {"answer": "echo: prices?", "score": 3, "kind": "a", "tags": ["echo: prices?"]}
    native = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    body = chat("prices?", response_format=native)
    content = (await client.post("/chat/completions", json=body)).json()["choices"][0]
    assert json.loads(content["message"]["content"]) == want
    # As the gateway asks a provider without native structured output.
    body = chat("prices?", response_format={"type": "json_object"})
    body["messages"].append(
        {"role": "system", "content": "valid against this JSON Schema:\n" + json.dumps(schema)}
    )
    content = (await client.post("/chat/completions", json=body)).json()["choices"][0]
    assert json.loads(content["message"]["content"]) == want


async def test_scripted_tool_calls_whole_and_streamed(
    client: httpx.AsyncClient, control: DevProviderControl
) -> None:
    tools = [{"type": "function", "function": {"name": "quote", "parameters": {}}}]
    calls = [{"id": "c1", "name": "quote", "arguments": {"ticker": "AAPL"}}]
    await control.script({"tool_calls": calls}, {"tool_calls": calls})
    answer = (await client.post("/chat/completions", json=chat("q", tools=tools))).json()
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [
        {
            "id": "c1",
            "type": "function",
            "function": {"name": "quote", "arguments": '{"ticker": "AAPL"}'},
        }
    ]
    body = chat("q", tools=tools, stream=True)
    async with client.stream("POST", "/chat/completions", json=body) as response:
        events = data_events([line async for line in response.aiter_lines()])
    pieces = [
        json.loads(e)["choices"][0]["delta"].get("tool_calls") for e in events if e != "[DONE]"
    ]
    pieces = [p[0] for p in pieces if p]
    assert pieces[0]["id"] == "c1" and pieces[0]["function"]["name"] == "quote"
    assert "".join(p["function"]["arguments"] for p in pieces) == '{"ticker": "AAPL"}'
    assert len(pieces) > 2


async def test_tool_messages_must_answer_a_call(client: httpx.AsyncClient) -> None:
    body = chat("q")
    body["messages"].append({"role": "tool", "content": "r", "tool_call_id": "nope"})
    response = await client.post("/chat/completions", json=body)
    assert response.status_code == 400 and "tool" in response.json()["error"]["message"]
    body = chat("q", tool_choice="auto")
    assert (await client.post("/chat/completions", json=body)).status_code == 400


async def test_streaming_with_usage(client: httpx.AsyncClient) -> None:
    body = chat("one two three", stream=True, stream_options={"include_usage": True})
    async with client.stream("POST", "/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in response.aiter_lines()]
    events = data_events(lines)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert stream_content(events) == "echo: one two three"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    assert chunks[-1]["usage"]["total_tokens"] == chunks[-1]["usage"]["prompt_tokens"] + 4


async def test_streaming_without_usage_has_no_usage_chunk(client: httpx.AsyncClient) -> None:
    async with client.stream("POST", "/chat/completions", json=chat("x", stream=True)) as r:
        events = data_events([line async for line in r.aiter_lines()])
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["choices"] and "usage" not in c for c in chunks)


async def test_models_list(client: httpx.AsyncClient) -> None:
    payload = (await client.get("/models")).json()
    assert payload["object"] == "list"
    assert {m["id"] for m in payload["data"]} >= {"deepseek-chat", "deepseek-reasoner"}


async def test_invalid_body_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat/completions", json={"model": "m", "messages": []})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


# -- auth ------------------------------------------------------------------------------


async def test_wrong_key_is_401_and_keeps_scripted_action(
    provider: DevProvider, client: httpx.AsyncClient, control: DevProviderControl
) -> None:
    await control.script({"status": 500})
    async with httpx.AsyncClient(base_url=provider.base_url) as anonymous:
        missing = await anonymous.post("/chat/completions", json=chat())
        wrong = await anonymous.post(
            "/chat/completions", json=chat(), headers={"Authorization": "Bearer sk-wrong"}
        )
    for response in (missing, wrong):
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    assert (await client.post("/chat/completions", json=chat())).status_code == 500


# -- scripted faults -------------------------------------------------------------------


async def test_429_with_retry_after_seconds(
    client: httpx.AsyncClient, control: DevProviderControl
) -> None:
    await control.script({"status": 429, "retry_after": 2})
    response = await client.post("/chat/completions", json=chat())
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert response.json()["error"]["type"] == "rate_limit_error"
    assert (await client.post("/chat/completions", json=chat())).status_code == 200


async def test_retry_after_http_date(
    client: httpx.AsyncClient, control: DevProviderControl
) -> None:
    await control.script({"status": 503, "retry_after": 30, "retry_after_format": "http-date"})
    response = await client.post("/chat/completions", json=chat())
    when = email.utils.parsedate_to_datetime(response.headers["retry-after"])
    assert 25 <= when.timestamp() - time.time() <= 31


@pytest.mark.parametrize("status", [400, 401, 402, 422, 500, 502, 503, 504])
async def test_scripted_status_has_openai_error_body(
    status: int, client: httpx.AsyncClient, control: DevProviderControl
) -> None:
    await control.script({"status": status, "message": f"scripted {status}"})
    response = await client.post("/chat/completions", json=chat())
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] == f"scripted {status}"
    assert set(error) == {"message", "type", "param", "code"}


async def test_fifo_queue_then_default_then_normal(
    client: httpx.AsyncClient, control: DevProviderControl
) -> None:
    await control.script({"status": 500}, {"status": 502, "times": 2}, default={"status": 503})
    statuses = [(await client.post("/chat/completions", json=chat())).status_code for _ in "1234"]
    assert statuses == [500, 502, 502, 503]
    await control.set_default(None)
    assert (await client.post("/chat/completions", json=chat())).status_code == 200


async def test_delay_ms(client: httpx.AsyncClient, control: DevProviderControl) -> None:
    await control.script({"delay_ms": 200})
    started = time.monotonic()
    assert (await client.post("/chat/completions", json=chat())).status_code == 200
    assert time.monotonic() - started >= 0.19


async def test_drop_closes_without_response(
    client: httpx.AsyncClient, control: DevProviderControl
) -> None:
    await control.script({"drop": True})
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        await client.post("/chat/completions", json=chat())
    entry = await wait_for_entry(control, lambda e: e["outcome"] == "dropped")
    assert entry["status"] is None


async def test_hang_until_client_timeout_is_logged_cancelled(
    provider: DevProvider, control: DevProviderControl
) -> None:
    await control.script({"hang": True})
    async with httpx.AsyncClient(base_url=provider.base_url, headers=AUTH, timeout=0.3) as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.post("/chat/completions", json=chat())
    entry = await wait_for_entry(control, lambda e: e["cancelled"])
    assert entry["outcome"] == "cancelled"
    assert entry["status"] is None


async def test_cut_stream_ends_without_done(
    client: httpx.AsyncClient, control: DevProviderControl
) -> None:
    await control.script({"cut_after_chunks": 2, "content": "one two three four five"})
    lines: list[str] = []
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        async with client.stream("POST", "/chat/completions", json=chat(stream=True)) as r:
            async for line in r.aiter_lines():
                lines.append(line)
    events = data_events(lines)
    assert "[DONE]" not in events
    assert stream_content(events) == "one two"
    entry = await wait_for_entry(control, lambda e: e["outcome"] == "cut")
    assert entry["chunks_sent"] == 2


async def test_cut_non_stream_body(client: httpx.AsyncClient, control: DevProviderControl) -> None:
    await control.script({"cut_after_chunks": 0})
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        await client.post("/chat/completions", json=chat())


async def test_keepalive_blank_lines_before_json(
    client: httpx.AsyncClient, control: DevProviderControl
) -> None:
    await control.script({"keepalive_lines": 3, "keepalive_interval_ms": 50})
    started = time.monotonic()
    response = await client.post("/chat/completions", json=chat("hi"))
    assert time.monotonic() - started >= 0.14
    assert response.content.startswith(b"\n\n\n{")
    assert response.json()["choices"][0]["message"]["content"] == "echo: hi"


async def test_keepalive_comments_before_stream(
    client: httpx.AsyncClient, control: DevProviderControl
) -> None:
    await control.script({"keepalive_lines": 2, "keepalive_interval_ms": 20})
    async with client.stream("POST", "/chat/completions", json=chat("hi", stream=True)) as r:
        lines = [line async for line in r.aiter_lines() if line]
    assert lines[:2] == [": keep-alive", ": keep-alive"]
    assert lines[2].startswith("data: ")
    assert data_events(lines)[-1] == "[DONE]"


async def test_endless_keepalive_defeats_read_timeout(
    provider: DevProvider, control: DevProviderControl
) -> None:
    # Bytes keep flowing, so httpx's per-read timeout never fires: only a total deadline helps.
    await control.script({"keepalive_lines": 10**9, "keepalive_interval_ms": 50})
    async with httpx.AsyncClient(base_url=provider.base_url, headers=AUTH, timeout=0.2) as c:
        received = bytearray()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.6):
                async with c.stream("POST", "/chat/completions", json=chat()) as r:
                    async for data in r.aiter_raw():
                        received += data
    assert received and set(received) == {ord("\n")}
    entry = await wait_for_entry(control, lambda e: e["cancelled"])
    assert entry["status"] == 200


async def test_disconnect_mid_stream_is_logged_cancelled(
    client: httpx.AsyncClient, control: DevProviderControl
) -> None:
    await control.script({"chunk_delay_ms": 100, "content": "w " * 20})
    async with client.stream("POST", "/chat/completions", json=chat(stream=True)) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                break  # leaving the block closes the connection mid-stream
    entry = await wait_for_entry(control, lambda e: e["cancelled"])
    assert 0 <= entry["chunks_sent"] < 20


async def test_content_usage_and_reasoning_overrides(
    client: httpx.AsyncClient, control: DevProviderControl
) -> None:
    await control.script(
        {
            "content": "fixed reply",
            "reasoning_content": "think hard",
            "usage": {"prompt_cache_hit_tokens": 3},
            "headers": {"x-ds-trace": "abc"},
        }
    )
    response = await client.post("/chat/completions", json=chat())
    payload = response.json()
    assert response.headers["x-ds-trace"] == "abc"
    assert payload["choices"][0]["message"]["content"] == "fixed reply"
    assert payload["choices"][0]["message"]["reasoning_content"] == "think hard"
    usage = payload["usage"]
    assert usage["prompt_cache_hit_tokens"] == 3
    assert usage["prompt_cache_miss_tokens"] == usage["prompt_tokens"] - 3
    assert usage["prompt_tokens_details"]["cached_tokens"] == 3
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 2
    assert usage["completion_tokens"] == 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + 4


# -- control API -----------------------------------------------------------------------


async def test_request_log_records_requests(
    client: httpx.AsyncClient, control: DevProviderControl
) -> None:
    await control.script({"status": 500})
    before = time.time()
    await client.post("/chat/completions", json=chat("first"), headers={"x-trace": "t1"})
    await client.post("/chat/completions", json=chat("second"))
    first, second = await control.requests()
    assert first["path"] == "/v1/chat/completions"
    assert first["method"] == "POST"
    assert first["headers"]["x-trace"] == "t1"
    assert first["headers"]["authorization"] == AUTH["Authorization"]
    assert first["body"]["messages"][-1]["content"] == "first"
    assert first["action"] == {"status": 500}
    assert (first["status"], first["outcome"], first["cancelled"]) == (500, "error", False)
    assert (second["status"], second["outcome"]) == (200, "ok")
    assert before <= first["ts"] <= second["ts"] <= time.time()
    assert first["mono"] <= second["mono"]
    assert [e["id"] for e in await control.requests(since=first["id"])] == [second["id"]]


async def test_control_state_and_reset(control: DevProviderControl) -> None:
    await control.script({"status": 429}, default={"delay_ms": 1})
    state = await control.state()
    assert state["queued"] == [{"status": 429}]
    assert state["default"] == {"delay_ms": 1}
    await control.reset()
    assert (await control.state())["queued"] == []
    assert await control.requests() == []


async def test_control_rejects_unknown_action_key(control: DevProviderControl) -> None:
    with pytest.raises(httpx.HTTPStatusError) as info:
        await control.script({"stauts": 429})
    assert info.value.response.status_code == 400
    assert "stauts" in info.value.response.json()["error"]["message"]


def test_validate_action_types() -> None:
    assert validate_action({"status": 429, "retry_after": "Wed, 21 Oct 2015 07:28:00 GMT"})
    bad_actions: list[object] = [
        {"status": True},  # bool is an int subclass but not a status
        {"hang": 1},
        {"delay_ms": "5"},
        [],
        {"retry_after_format": "x"},
    ]
    for bad in bad_actions:
        with pytest.raises(ScriptError):
            validate_action(bad)


# -- HTTP/1.1 details ------------------------------------------------------------------


async def raw_exchange(provider: DevProvider, payload: bytes, responses: int) -> list[bytes]:
    reader, writer = await asyncio.open_connection(provider.host, provider.port)
    try:
        writer.write(payload)
        result = []
        for _ in range(responses):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            result.append(head + await reader.readexactly(length))
        return result
    finally:
        writer.close()


def raw_request(body: bytes, *extra: str) -> bytes:
    head = [
        "POST /v1/chat/completions HTTP/1.1",
        "Host: test",
        f"Authorization: Bearer {DEFAULT_API_KEY}",
        *extra,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def test_keep_alive_pipelining_on_one_connection(provider: DevProvider) -> None:
    first = json.dumps(chat("first")).encode()
    second = json.dumps(chat("second")).encode()
    payload = raw_request(first, f"Content-Length: {len(first)}") + raw_request(
        second, f"Content-Length: {len(second)}"
    )
    responses = await raw_exchange(provider, payload, 2)
    assert all(r.startswith(b"HTTP/1.1 200 OK") for r in responses)
    assert b"echo: first" in responses[0]
    assert b"echo: second" in responses[1]


async def test_chunked_request_body(provider: DevProvider) -> None:
    body = json.dumps(chat("chunked")).encode()
    framed = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    (response,) = await raw_exchange(provider, raw_request(framed, "Transfer-Encoding: chunked"), 1)
    assert b"echo: chunked" in response


# -- separate process and throughput ----------------------------------------------------


async def test_process_mode_throughput() -> None:
    # 100 closed-loop connections at a fixed 50 ms latency: the ceiling is 2,000 requests/s.
    async with DevProviderProcess(latency_ms=50) as child:
        async with DevProviderControl(child.root_url) as control:
            assert (await control.state())["latency_ms"] == 50
        await run_load(child.base_url, requests=500, concurrency=100)  # warm-up
        result = await run_load(child.base_url, requests=4000, concurrency=100)
    assert result.errors == 0
    assert result.requests == 4000
    assert result.p50_ms >= 50
    assert result.rps >= 1000, result
