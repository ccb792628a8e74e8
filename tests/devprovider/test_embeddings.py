"""The dev provider's OpenAI-compatible `/embeddings`: deterministic hashed bag-of-words
vectors, usage, validation, and the scripted faults of chat completions."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from libs.devprovider import DEFAULT_API_KEY, DevProvider, DevProviderControl
from libs.devprovider.embeddings import DEFAULT_DIMENSIONS, embed_text

AUTH = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}


@pytest.fixture(scope="module")
async def provider() -> AsyncIterator[DevProvider]:
    async with DevProvider() as running:
        yield running


@pytest.fixture(autouse=True)
def fresh_state(provider: DevProvider) -> None:
    provider.state.reset()


@pytest.fixture(scope="module")
async def client(provider: DevProvider) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=provider.base_url, headers=AUTH, timeout=5) as c:
        yield c


@pytest.fixture(scope="module")
async def control(provider: DevProvider) -> AsyncIterator[DevProviderControl]:
    async with DevProviderControl(provider.base_url) as c:
        yield c


def body(*texts: str, **extra: Any) -> dict[str, Any]:
    return {"model": "dev-embed", "input": list(texts), "encoding_format": "float", **extra}


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


async def test_vectors_are_deterministic_unit_vectors_with_usage(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post("/embeddings", json=body("The cat sat", "a dog ran far"))
    assert r.status_code == 200
    data = r.json()
    assert data["object"] == "list" and data["model"] == "dev-embed"
    assert [d["index"] for d in data["data"]] == [0, 1]
    vectors = [d["embedding"] for d in data["data"]]
    assert all(len(v) == DEFAULT_DIMENSIONS for v in vectors)
    assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1.0) for v in vectors)
    assert vectors[0] == embed_text("The cat sat")
    assert data["usage"] == {"prompt_tokens": 3 + 4, "total_tokens": 7}
    again = await client.post("/embeddings", json=body("The cat sat"))
    assert again.json()["data"][0]["embedding"] == vectors[0]


async def test_texts_sharing_words_are_similar(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/embeddings",
        json=body("interest rates rise", "Interest RATES fall", "penguins swim"),
    )
    a, b, c = (d["embedding"] for d in r.json()["data"])
    assert cosine(a, b) > 0.5  # case does not matter, two words of three shared
    assert cosine(a, b) > cosine(a, c)


async def test_dimensions_and_a_single_string_input(provider: DevProvider) -> None:
    async with httpx.AsyncClient(base_url=provider.root_url, headers=AUTH, timeout=5) as c:
        r = await c.post("/embeddings", json={"model": "m", "input": "one text", "dimensions": 8})
    (item,) = r.json()["data"]
    assert len(item["embedding"]) == 8


@pytest.mark.parametrize(
    "bad",
    [
        {"input": ["x"]},
        {"model": "m"},
        {"model": "m", "input": []},
        {"model": "m", "input": ["ok", ""]},
        {"model": "m", "input": [[1, 2, 3]]},
        {"model": "m", "input": ["ok"], "dimensions": 0},
        {"model": "m", "input": ["ok"], "encoding_format": "base64"},
    ],
)
async def test_invalid_body_is_400(client: httpx.AsyncClient, bad: dict[str, Any]) -> None:
    r = await client.post("/embeddings", json=bad)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


async def test_wrong_key_is_401(provider: DevProvider) -> None:
    async with httpx.AsyncClient(base_url=provider.base_url, timeout=5) as c:
        r = await c.post("/embeddings", json=body("x"), headers={"Authorization": "Bearer no"})
    assert r.status_code == 401


async def test_scripted_faults_apply_as_for_chat(
    client: httpx.AsyncClient, control: DevProviderControl
) -> None:
    await control.script(
        {"status": 429, "retry_after": 2},
        {"status": 500},
        {"delay_ms": 150},
        {"usage": {"prompt_tokens": 99}},
        {"body": {"data": "garbage"}},
    )
    r = await client.post("/embeddings", json=body("x"))
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    r = await client.post("/embeddings", json=body("x"))
    assert r.status_code == 500
    started = time.monotonic()
    r = await client.post("/embeddings", json=body("x"))
    assert r.status_code == 200 and time.monotonic() - started >= 0.14
    r = await client.post("/embeddings", json=body("x"))
    assert r.json()["usage"]["prompt_tokens"] == 99
    r = await client.post("/embeddings", json=body("x"))
    assert r.json() == {"data": "garbage"}
    log = await control.requests()
    assert [e["status"] for e in log] == [429, 500, 200, 200, 200]
    assert all(e["path"] == "/v1/embeddings" for e in log)
    assert log[0]["body"]["input"] == ["x"]


async def test_drop_closes_without_response(
    client: httpx.AsyncClient, control: DevProviderControl
) -> None:
    await control.script({"drop": True})
    with pytest.raises(httpx.TransportError):
        await client.post("/embeddings", json=body("x"))
    (entry,) = await control.requests()
    assert entry["outcome"] == "dropped"
