"""The kit's per-RPC fast paths keep the behaviour they replace: the interceptor's
per-method cache follows policy changes; the log redactor's literal pre-check masks
exactly what the patterns alone mask."""

from __future__ import annotations

import grpc
import pytest

from libs.common.interceptors import MethodPolicy
from libs.common.logging import _PATTERNS, _mask, redact
from tests.common.conftest import Echo
from tests.conftest import Keys


async def test_method_cache_follows_a_policy_change(echo: Echo, api_keys: Keys) -> None:
    md = api_keys.metadata(api_keys.alice)
    assert await echo.unary("Echo")(b"x", metadata=md, timeout=5) == b"x"
    assert await echo.unary("Echo")(b"y", metadata=md, timeout=5) == b"y"  # cached handler
    echo.host.add_policy("Echo", MethodPolicy(scope="nothing.granted.here"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await echo.unary("Echo")(b"z", metadata=md, timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    "text",
    [
        "Authorization: Bearer fsk_abcdefghijkl",
        "BEARER    abc.def-ghij~kl",
        "key sk-0123456789abcdef in text",
        "xsk-0123456789abcdef (no word boundary)",
        "apikey: 'abcd1234'",
        "API-KEY=abcdefgh",
        'TOKEN="zzzzzz"',
        "password = hunter22",
        "\u017fecret=abcdefg",  # long s: re.IGNORECASE matches it as "s"
        "\u212aey token: \u212a\u212a\u212a\u212a",  # Kelvin sign folds to "k"
        '{"grpc_method": "Complete", "tenant": "acme", "peer": "ipv4:127.0.0.1:5"}',
        "nothing secret here",
    ],
)
def test_redaction_pre_check_masks_what_the_patterns_mask(text: str) -> None:
    expected = text
    for pattern, _, _ in _PATTERNS:  # the patterns alone, always applied
        expected = pattern.sub(_mask, expected)
    assert redact(text) == expected
