"""gRPC adapters for the Analyze ports: the memory service and the LLM gateway.

They translate domain turns <-> protobuf and gRPC failures -> `DownstreamFailed` (which
Analyze degrades around) or a caller error that must reach the client unchanged (an
unknown model, a session of another user). Channels come from
`libs.common.clients.create_channel`: the caller's key is forwarded and the deadline
propagated (`timeout` here can only shorten it).
"""

from __future__ import annotations

from typing import Final

import grpc

from finsight.common.v1 import common_pb2
from finsight.llm.v1 import llm_gateway_pb2, llm_gateway_pb2_grpc
from finsight.memory.v1 import memory_pb2, memory_pb2_grpc
from libs.common.clients import known_unreachable
from libs.common.errors import FinsightError, InvalidArgument, NotFound, status_info
from services.analytics.analyze import (
    ChatTurn,
    Completion,
    Context,
    DownstreamFailed,
    Role,
    SchemaMismatch,
    Usage,
)

_ROLE_PB: Final = {
    "system": common_pb2.ROLE_SYSTEM,
    "user": common_pb2.ROLE_USER,
    "assistant": common_pb2.ROLE_ASSISTANT,
}
_ROLE: Final[dict[int, Role]] = {v: k for k, v in _ROLE_PB.items()}  # type: ignore[misc]


def _describe(exc: grpc.aio.AioRpcError) -> str:
    info = status_info(exc)
    reason = info.reason or exc.code().name
    return f"{exc.code().name} {reason}: {info.message[:200]}"


def _fail_fast(channel: grpc.aio.Channel, service: str) -> None:
    """Analyze degrades without this service: when its channel already knows it is
    unreachable, degrade now rather than after the retries' backoff (~0.3 s a call)."""
    if known_unreachable(channel):
        raise DownstreamFailed(f"UNAVAILABLE UNREACHABLE: {service} is not reachable")


def _chat(turns: list[ChatTurn]) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=_ROLE_PB[t.role], content=t.content) for t in turns]


class GrpcMemory:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.stub = memory_pb2_grpc.MemoryServiceStub(channel)

    async def build_context(
        self,
        session_id: str,
        user_id: str,
        query: str,
        system_preamble: str,
        token_budget: int,
        timeout: float | None,
    ) -> Context:
        request = memory_pb2.BuildContextRequest(
            session_id=session_id,
            user_id=user_id,
            query=query,
            token_budget=token_budget,
            system_preamble=system_preamble,
        )
        _fail_fast(self.channel, "memory")
        try:
            reply = await self.stub.BuildContext(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                # Memory answers NOT_FOUND for a session that belongs to another user.
                raise NotFound(
                    "session not found for this user", reason="SESSION_NOT_FOUND"
                ) from exc
            raise DownstreamFailed(_describe(exc)) from exc
        except FinsightError as exc:  # e.g. the caller's deadline already passed
            raise DownstreamFailed(exc.message) from exc
        return Context(
            [
                ChatTurn(_ROLE.get(m.role, "user"), m.content)
                for m in reply.messages
                if m.role in _ROLE
            ],
            tuple(reply.flagged_fact_ids),
        )

    async def append_exchange(
        self,
        session_id: str,
        user_id: str,
        turns: list[ChatTurn],
        client_ids: list[str],
        metadata: dict[str, str],
        timeout: float | None,
    ) -> None:
        request = memory_pb2.AppendMessagesRequest(
            session_id=session_id,
            user_id=user_id,
            messages=[
                memory_pb2.NewMessage(message=m, client_message_id=cid, metadata=metadata)
                for m, cid in zip(_chat(turns), client_ids, strict=True)
            ],
        )
        _fail_fast(self.channel, "memory")
        try:
            await self.stub.AppendMessages(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise DownstreamFailed(_describe(exc)) from exc
        except FinsightError as exc:
            raise DownstreamFailed(exc.message) from exc


class GrpcCompleter:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.stub = llm_gateway_pb2_grpc.LlmGatewayServiceStub(channel)

    async def complete(
        self,
        messages: list[ChatTurn],
        model: str,
        max_tokens: int,
        timeout: float | None,
        json_schema: str = "",
    ) -> Completion:
        request = llm_gateway_pb2.CompleteRequest(
            model=model,
            messages=_chat(messages),
            max_tokens=max_tokens,
            temperature=0.0,
            json_schema=json_schema,
        )
        _fail_fast(self.channel, "the LLM gateway")
        try:
            reply = await self.stub.Complete(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            info = status_info(exc)
            bad_model = any(v.field == "model" for v in info.field_violations)
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_model and model:
                raise InvalidArgument.field("model", info.message) from exc
            if info.reason == "SCHEMA_MISMATCH":
                raise SchemaMismatch(_describe(exc)) from exc
            raise DownstreamFailed(_describe(exc)) from exc
        except FinsightError as exc:
            raise DownstreamFailed(exc.message) from exc
        u = reply.usage
        return Completion(
            reply.content,
            reply.model,
            Usage(
                u.prompt_tokens,
                u.completion_tokens,
                u.cached_prompt_tokens,
                u.reasoning_tokens,
                u.total_tokens,
                cost_nanos=reply.cost.units * 1_000_000_000 + reply.cost.nanos,
                currency=reply.cost.currency_code or "USD",
            ),
            tuple((r.kind, r.count) for r in reply.redactions),
            reply.schema_repaired,
        )
