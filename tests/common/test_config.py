"""Configuration: readable errors, prod safety, *_FILE secrets, .env.example in step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from libs.common.config import ConfigError, load_settings
from libs.common.envdoc import documented_names, render, settings_models
from services.memory.config import MemorySettings

ROOT = Path(__file__).resolve().parents[2]


def test_env_example_matches_the_settings_models() -> None:
    committed = (ROOT / ".env.example").read_text()
    assert committed == render(), "run `make env-example` and commit .env.example"
    names = documented_names(committed)
    for model in settings_models():
        for field in model.model_fields:
            assert field.upper() in names, f"{field.upper()} missing from .env.example"


def test_all_errors_are_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(
            MemorySettings,
            _env_file=None,
            memory_grpc_port="not-a-port",
            finsight_env="qa",
            finsight_redis_timeout_s=-1,
            finsight_api_keys_file=tmp_path / "k.json",
        )
    text = str(err.value)
    assert text.startswith("Invalid configuration for memory (3 problems):")
    for name in ("MEMORY_GRPC_PORT", "FINSIGHT_ENV", "FINSIGHT_REDIS_TIMEOUT_S"):
        assert name in text
    assert "Traceback" not in text


def test_a_stream_longer_than_the_connection_grace_is_refused() -> None:
    from services.llm_gateway.config import GatewaySettings

    with pytest.raises(ConfigError) as err:
        load_settings(
            GatewaySettings,
            _env_file=None,
            finsight_auth_enabled=False,
            llm_gateway_stream_max_s=1200,
            finsight_max_connection_age_grace_s=900,
        )
    assert "LLM_GATEWAY_STREAM_MAX_S must not exceed FINSIGHT_MAX_CONNECTION_AGE_GRACE_S" in str(
        err.value
    )
    ok = load_settings(GatewaySettings, _env_file=None, finsight_auth_enabled=False,
                       llm_gateway_stream_max_s=1200, finsight_max_connection_age_grace_s=1800)  # fmt: skip
    assert ok.llm_gateway_stream_max_s == 1200


def test_prod_refuses_insecure_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(
            MemorySettings,
            _env_file=None,
            finsight_env="prod",
            finsight_auth_enabled=False,
            finsight_service_api_key="changeme-please",
        )
    text = str(err.value)
    assert "FINSIGHT_AUTH_ENABLED=false" in text
    assert "plaintext" in text
    assert "placeholder value for FINSIGHT_SERVICE_API_KEY" in text
    assert "changeme-please" not in text  # a secret is never echoed


def test_prod_accepts_explicit_plaintext_opt_in_with_auth(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": []}')
    settings = load_settings(
        MemorySettings,
        _env_file=None,
        finsight_env="prod",
        finsight_api_keys_file=keys,
        finsight_allow_plaintext=True,
    )
    assert settings.finsight_env == "prod"


def test_secret_from_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "service-key"
    secret.write_text("s3cr3t-from-file\n")
    monkeypatch.setenv("FINSIGHT_SERVICE_API_KEY_FILE", str(secret))
    settings = load_settings(MemorySettings, _env_file=None, finsight_auth_enabled=False)
    assert settings.finsight_service_api_key is not None
    assert settings.finsight_service_api_key.get_secret_value() == "s3cr3t-from-file"
    assert "s3cr3t" not in repr(settings)


def test_unreadable_secret_file_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINSIGHT_SERVICE_API_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="FINSIGHT_SERVICE_API_KEY_FILE"):
        load_settings(MemorySettings, _env_file=None, finsight_auth_enabled=False)


def test_service_exits_2_with_a_readable_message(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "MEMORY_GRPC_PORT": "abc",
        "FINSIGHT_ENV": "prod",
        "FINSIGHT_AUTH_ENABLED": "false",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "services.memory"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "Invalid configuration for memory" in proc.stderr
    assert "MEMORY_GRPC_PORT" in proc.stderr
    assert "Traceback" not in proc.stderr
