"""A valid, effective request for every RPC of the three services (keyed `Service.Method`,
`process:AdminService.Backup` for the two Backup RPCs), aimed at a given user, session and
symbols: what an attacker would send, and what the fuzzer mutates."""

from __future__ import annotations

from google.protobuf.message import Message

from finsight.analytics.v1 import analytics_pb2 as apb
from finsight.common.v1 import admin_pb2, common_pb2
from finsight.llm.v1 import llm_gateway_pb2 as gpb
from finsight.memory.v1 import memory_pb2 as mpb
from tests.security.stack import random_walk_series


def user_message(text: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)


def valid_requests(
    user: str,
    session: str,
    symbols: tuple[str, str, str] = ("FZA", "FZB", "^FZI"),
    *,
    erase_user: str | None = None,
    new_symbol: str = "FZN",
) -> dict[str, list[tuple[Message, ...]]]:
    """Per RPC, one or more valid requests (a tuple of stream messages for IngestBars).
    `erase_user` is the user SetConsent/DeleteUserData act on (default: `user`)."""
    a, b, bench = symbols
    erase = erase_user or user
    msg = mpb.NewMessage(message=user_message("hello there"), metadata={"src": "test"})
    fact = mpb.NewFact(text="likes bonds", kind="pref", importance=0.7, tags=["x"])
    holdings = [apb.Holding(symbol=a, weight=0.5), apb.Holding(symbol=b, weight=0.5)]
    one: dict[str, list[Message]] = {
        "MemoryService.AppendMessages": [
            mpb.AppendMessagesRequest(session_id=session, user_id=user, messages=[msg])
        ],
        "MemoryService.GetHistory": [
            mpb.GetHistoryRequest(session_id=session, user_id=user, page_size=10)
        ],
        "MemoryService.Remember": [mpb.RememberRequest(user_id=user, facts=[fact])],
        "MemoryService.Recall": [
            mpb.RecallRequest(
                user_id=user, query="risk", k=5, filter=mpb.FactFilter(kinds=["pref"])
            )
        ],
        "MemoryService.Forget": [
            mpb.ForgetRequest(user_id=user, fact_ids=["fct_" + "0" * 32]),
            mpb.ForgetRequest(user_id=user, filter=mpb.FactFilter(tags=["no-such-tag"])),
        ],
        "MemoryService.ListFacts": [
            mpb.ListFactsRequest(user_id=user, page_size=10),
            mpb.ListFactsRequest(user_id=user, kinds=["pref"], include_history=True),
        ],
        "MemoryService.GetExtractionStatus": [mpb.GetExtractionStatusRequest(user_id=user)],
        "MemoryService.BuildContext": [
            mpb.BuildContextRequest(
                session_id=session, user_id=user, query="how risky?", token_budget=1024
            )
        ],
        "MemoryService.SetConsent": [mpb.SetConsentRequest(user_id=erase, long_term_memory=False)],
        "MemoryService.GetConsent": [mpb.GetConsentRequest(user_id=user)],
        "MemoryService.ExportUserData": [mpb.ExportUserDataRequest(user_id=user)],
        "MemoryService.DeleteUserData": [mpb.DeleteUserDataRequest(user_id=erase)],
        "MemoryService.PurgeExpired": [mpb.PurgeExpiredRequest()],
        "AnalyticsService.ListSymbols": [apb.ListSymbolsRequest()],
        "AnalyticsService.GetBars": [apb.GetBarsRequest(symbol=a, page_size=50)],
        "AnalyticsService.ComputeMetrics": [
            apb.ComputeMetricsRequest(symbols=[a, b], benchmark=bench)
        ],
        "AnalyticsService.RollingMetrics": [
            apb.RollingMetricsRequest(symbol=a, metric=apb.ROLLING_METRIC_VOLATILITY, window=20),
            apb.RollingMetricsRequest(
                symbol=a, metric=apb.ROLLING_METRIC_BETA, window=30, benchmark=bench
            ),
        ],
        "AnalyticsService.ComputePortfolio": [
            apb.ComputePortfolioRequest(holdings=holdings, include_returns=True)
        ],
        "AnalyticsService.OptimizePortfolio": [
            apb.OptimizePortfolioRequest(
                symbols=[a, b],
                objective=apb.OPTIMIZATION_OBJECTIVE_MIN_VARIANCE,
                max_weight=0.8,
                frontier_points=3,
            ),
            apb.OptimizePortfolioRequest(
                symbols=[a, b], objective=apb.OPTIMIZATION_OBJECTIVE_RISK_PARITY, benchmark=bench
            ),
        ],
        "AnalyticsService.ComputeFactorExposure": [
            apb.ComputeFactorExposureRequest(
                symbol=a, factors=[apb.Factor(symbol=bench)], rolling_window=20
            ),
            apb.ComputeFactorExposureRequest(
                portfolio=apb.FactorPortfolio(holdings=holdings),
                factors=[apb.Factor(symbol=bench, excess_return=True)],
                standard_errors=apb.STANDARD_ERROR_TYPE_HAC,
            ),
        ],
        "AnalyticsService.Analyze": [
            apb.AnalyzeRequest(session_id=session, user_id=user, symbols=[a], question="risky?")
        ],
        "LlmGatewayService.Complete": [
            gpb.CompleteRequest(messages=[user_message("hello")], max_tokens=16)
        ],
        "LlmGatewayService.StreamComplete": [
            gpb.StreamCompleteRequest(messages=[user_message("hello")], max_tokens=16)
        ],
        "LlmGatewayService.CountTokens": [gpb.CountTokensRequest(messages=[user_message("hello")])],
        "LlmGatewayService.ListModels": [gpb.ListModelsRequest()],
        "LlmGatewayService.GetUsage": [gpb.GetUsageRequest()],
        "LlmGatewayService.Embed": [
            gpb.EmbedRequest(inputs=["hello there", "risk of bonds"]),
            gpb.EmbedRequest(model="embed", inputs=["hello"], dimensions=16),
        ],
        "memory:AdminService.Backup": [admin_pb2.BackupRequest()],
        "analytics:AdminService.Backup": [admin_pb2.BackupRequest()],
    }
    out: dict[str, list[tuple[Message, ...]]] = {
        name: [(m,) for m in msgs] for name, msgs in one.items()
    }
    out["AnalyticsService.IngestBars"] = [
        (apb.IngestBarsRequest(series=[random_walk_series(f"{new_symbol}0", 12, seed=1)]),),
        (
            apb.IngestBarsRequest(
                on_invalid=apb.INVALID_ROW_POLICY_REJECT_ALL,
                series=[random_walk_series(f"{new_symbol}1", 8, seed=2)],
            ),
            apb.IngestBarsRequest(series=[random_walk_series(f"{new_symbol}2", 8, seed=3)]),
        ),
    ]
    return out


def rpc_key(process: str, service_name: str, method: str) -> str:
    """The key of `valid_requests` for an RPC served by `process`."""
    if service_name == "AdminService":
        return f"{process}:AdminService.{method}"
    return f"{service_name}.{method}"
