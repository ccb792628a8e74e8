"""Text embeddings for semantic recall: one interface, a local model and the gateway.

- `LocalEmbedder` (MEMORY_EMBEDDING_PROVIDER=local, the default): the 256-dimension static
  model that ships inside the `wordllama` wheel (its "l2_supercat" weights, 16 MB), run in
  this process. Static embeddings are a table lookup plus a mean per text: ~0.03 ms of CPU
  per fact on this machine, no network, no model download, deterministic. Alternatives
  weighed (docs/memory.md "Hybrid recall"): model2vec and fastembed fetch their weights at
  run time (fails offline), sentence-transformers (all-MiniLM-L6-v2) needs torch (~700 MB
  and 5-20 ms per text on a CPU); those belong behind the gateway route instead.
- `GatewayEmbedder` (MEMORY_EMBEDDING_PROVIDER=gateway): the LLM gateway's `Embed` RPC, so
  a stronger model (self-hosted vLLM/TEI/Ollama, OpenAI…) gets the gateway's limits,
  retries, breakers, cost accounting and personal-data policy.

Every vector is float32 and unit length (so cosine similarity is a dot product), and is
stored with the model id that made it (`Embedder.model`): a fact whose vector came from
another model scores 0 on the vector part until the background re-embed catches it up
(services/memory/manager.py), so a score never mixes two models.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import grpc
import numpy as np

from finsight.llm.v1 import llm_gateway_pb2, llm_gateway_pb2_grpc
from services.memory.vectors import unit_rows

log = logging.getLogger(__name__)

LOCAL_CONFIG = "l2_supercat"
LOCAL_DIM = 256
LOCAL_MODEL = f"local/wordllama-{LOCAL_CONFIG}-{LOCAL_DIM}"
_INLINE_TEXTS = 64  # embed smaller batches on the event loop (tens of microseconds)


class EmbeddingUnavailable(Exception):
    """The embedder could not answer (gateway down, timeout): recall falls back to lexical."""


class Embedder(Protocol):
    """Turns texts into unit-length float32 vectors, shape (len(texts), dimensions)."""

    @property
    def model(self) -> str: ...

    async def embed(self, texts: Sequence[str]) -> np.ndarray: ...

    async def close(self) -> None: ...


class LocalEmbedder:
    """wordllama's shipped static model, in process (see the module docstring)."""

    def __init__(self) -> None:
        # Imported here (a service configured for "none" never loads it), with the root
        # logger put back: importing wordllama 0.4 calls logging.basicConfig(level=INFO).
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        try:
            import wordllama
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)

        folder = Path(wordllama.__file__).resolve().parent
        # 0.4.0's default cache folder is the user's, which is empty offline: point it at
        # the package's own weights and never download.
        self._model = wordllama.WordLlama.load(
            config=LOCAL_CONFIG, dim=LOCAL_DIM, cache_dir=folder, disable_download=True
        )

    @property
    def model(self) -> str:
        return LOCAL_MODEL

    def embed_now(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, LOCAL_DIM), np.float32)
        return unit_rows(self._model.embed(list(texts), norm=False))

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) <= _INLINE_TEXTS:
            return self.embed_now(texts)
        return await asyncio.to_thread(self.embed_now, texts)

    async def close(self) -> None:
        return None


class GatewayEmbedder:
    """The gateway's Embed RPC through a Finsight channel (the caller's key is forwarded
    while handling an RPC; background jobs use the service key, acting for the tenant
    whose facts they embed: `context.acting_for`)."""

    MAX_BATCH = 256  # EmbedRequest.inputs

    def __init__(self, channel: grpc.aio.Channel, route: str, timeout_s: float) -> None:
        self.channel = channel
        self.stub = llm_gateway_pb2_grpc.LlmGatewayServiceStub(channel)
        self.route = route
        self.timeout_s = timeout_s
        self._model = f"gateway/{route or 'default'}"
        self._answered_by = ""  # the gateway model behind the route, once known

    @property
    def model(self) -> str:
        return self._model

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows: list[np.ndarray] = []
        for lo in range(0, len(texts), self.MAX_BATCH):
            request = llm_gateway_pb2.EmbedRequest(
                model=self.route, inputs=list(texts[lo : lo + self.MAX_BATCH])
            )
            try:
                response = await self.stub.Embed(request, timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                raise EmbeddingUnavailable(
                    f"gateway Embed failed: {exc.code().name}: {exc.details()}"
                ) from exc
            if len(response.embeddings) != len(request.inputs):
                raise EmbeddingUnavailable("gateway Embed answered a different number of vectors")
            # Vectors of a fallback model live in another space: refuse them rather than
            # store them under the route's name.
            if self._answered_by and response.model != self._answered_by:
                raise EmbeddingUnavailable(
                    f"gateway Embed answered with {response.model!r}, not {self._answered_by!r}"
                )
            self._answered_by = response.model
            rows.append(np.array([e.values for e in response.embeddings], dtype=np.float32))
        if not rows:
            return np.zeros((0, 0), np.float32)
        return unit_rows(np.concatenate(rows))

    async def close(self) -> None:
        await self.channel.close()
