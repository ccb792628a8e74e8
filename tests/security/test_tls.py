"""TLS and mutual TLS end to end on the real services, with certificates made in the test.

The three services serve TLS (mTLS: they also require a client certificate signed by the
test CA), and analytics reaches memory and the gateway over the same mTLS, presenting its
own certificate, so `Analyze` answering from the LLM proves service-to-service mTLS.
Refused: a plaintext client, a client that does not trust the server's CA, and, under
mTLS, a client without a certificate or with one from another CA.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from finsight.analytics.v1 import analytics_pb2 as apb
from finsight.analytics.v1 import analytics_pb2_grpc
from finsight.memory.v1 import memory_pb2 as mpb
from finsight.memory.v1 import memory_pb2_grpc
from tests.pki import make_pki
from tests.security.stack import Stack, ingest, start_stack


def credentials(
    ca: Path, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


async def consent_via(channel: grpc.aio.Channel, stack: Stack) -> None:
    stub = memory_pb2_grpc.MemoryServiceStub(channel)
    await stub.GetConsent(
        mpb.GetConsentRequest(user_id="tls-user"), metadata=stack.keys.md("alice"), timeout=5
    )


async def refused(channel: grpc.aio.Channel, stack: Stack) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await consent_via(channel, stack)
    return err.value.code()


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
async def test_services_over_tls_and_refusals(tmp_path: Path, mutual: bool) -> None:
    pki = make_pki(tmp_path / "pki", leaves=("server", "client", "analytics"))
    rogue = make_pki(tmp_path / "rogue", leaves=("client",))
    server = {
        "finsight_tls_cert_file": pki["server_cert"],
        "finsight_tls_key_file": pki["server_key"],
        "finsight_tls_client_ca_file": pki["ca"] if mutual else None,
    }
    # Analytics' outbound channels trust the CA and present its own certificate (mTLS).
    outbound = {
        "finsight_tls_ca_file": pki["ca"],
        "finsight_tls_cert_file": pki["analytics_cert"] if mutual else pki["server_cert"],
        "finsight_tls_key_file": pki["analytics_key"] if mutual else pki["server_key"],
    }
    good = credentials(pki["ca"], pki["client_cert"], pki["client_key"])
    stack = await start_stack(
        tmp_path / "stack", common=server, analytics=outbound, credentials=good
    )
    try:
        target = stack.target("memory")
        # The trusted client works, on every service.
        await consent_via(stack.channel("memory"), stack)
        assert await stack.healthy()

        async with grpc.aio.insecure_channel(target) as plaintext:
            assert await refused(plaintext, stack) == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.secure_channel(target, credentials(rogue["ca"])) as untrusting:
            assert await refused(untrusting, stack) == grpc.StatusCode.UNAVAILABLE
        if mutual:
            async with grpc.aio.secure_channel(target, credentials(pki["ca"])) as no_cert:
                assert await refused(no_cert, stack) == grpc.StatusCode.UNAVAILABLE
            foreign = credentials(pki["ca"], rogue["client_cert"], rogue["client_key"])
            async with grpc.aio.secure_channel(target, foreign) as wrong_ca:
                assert await refused(wrong_ca, stack) == grpc.StatusCode.UNAVAILABLE

        # Service to service: analytics -> memory and gateway over (m)TLS.
        await ingest(stack, "alice_writer", ["TLSA"], days=40)
        an = analytics_pb2_grpc.AnalyticsServiceStub(stack.channel("analytics"))
        reply = await an.Analyze(
            apb.AnalyzeRequest(
                session_id="tls-s", user_id="tls-user", symbols=["TLSA"], question="risky?"
            ),
            metadata=stack.keys.md("alice"),
            timeout=30,
        )
        assert reply.commentary_source == apb.COMMENTARY_SOURCE_LLM, list(reply.warnings)
        assert not reply.warnings
        history = await memory_pb2_grpc.MemoryServiceStub(stack.channel("memory")).GetHistory(
            mpb.GetHistoryRequest(session_id="tls-s"), metadata=stack.keys.md("alice"), timeout=5
        )
        assert len(history.messages) == 2  # the question and the answer, stored over mTLS
    finally:
        await stack.close()
