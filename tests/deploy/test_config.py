"""ConfigMap = the settings models: every key a service reads is set, every value
parses, secrets come from mounted Secrets, and prod refuses the example Secrets."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from libs.common.auth import KeyStore
from libs.common.config import CommonSettings, ConfigError, _is_secret, load_settings
from libs.common.envdoc import render_kustomize_env, settings_models
from tests.deploy.conftest import (
    BACKUP_JOBS,
    DUCKDB_OVERLAYS,
    FINSIGHT,
    K8S,
    OVERLAYS,
    POSTGRES_OVERLAYS,
    STORES,
    Rendered,
    app_name,
    pod_environment,
    pod_spec,
    secrets_by_name,
)

MODELS = {m.service_name: m for m in settings_models()}
# Env vars a pod may set that are not settings: Downward API helpers and the
# OpenTelemetry SDK's own variable.
NOT_SETTINGS = {"POD_NAME", "POD_NAMESPACE", "NODE_NAME", "OTEL_RESOURCE_ATTRIBUTES"}


def test_base_settings_env_is_generated_from_the_models() -> None:
    committed = (K8S / "base" / "settings" / "settings.env").read_text()
    assert committed == render_kustomize_env(), (
        "run `python -m libs.common.envdoc --kustomize-env > deploy/k8s/base/settings/settings.env`"
    )


def _all_fields() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in settings_models():
        for name, field in model.model_fields.items():
            out[name.upper()] = field
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_setting_with_a_value_is_in_the_configmap(
    overlays: dict[str, Rendered], overlay: str
) -> None:
    config = overlays[overlay].config()
    fields = _all_fields()
    for key, field in fields.items():
        if _is_secret(field):
            assert key not in config, f"{key} is a secret: mount it and set {key}_FILE"
        elif field.get_default(call_default_factory=True) is not None:
            assert key in config, f"{key} missing from the ConfigMap"
    unknown = set(config) - set(fields)
    assert not unknown, f"ConfigMap keys no service reads: {sorted(unknown)}"
    assert all(v != "" for v in config.values()), "an empty value would set a setting to ''"
    assert config["FINSIGHT_ENV"] == overlay
    assert config["FINSIGHT_BIND_HOST"] == "0.0.0.0"


def real_value(secret: str, key: str, value: str) -> str:
    """A non-placeholder stand-in for an example Secret value, of the same shape: a DSN
    stays a DSN (only its placeholder password changes), a key becomes a key."""
    if value.startswith("postgresql://"):
        return re.sub(r"replace-me[\w-]*", "9f2c4e7a1b3d5f60", value)
    return f"fsk_{secret}_{key}_9f2c4e7a1b"


def _load(
    model: type[CommonSettings], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> CommonSettings:
    for key in list(os.environ):
        if key.upper().removesuffix("_FILE") in _all_fields() or key in NOT_SETTINGS:
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_settings(model, _env_file=None)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_loads_its_settings_from_the_pod_environment(
    overlays: dict[str, Rendered], overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = overlays[overlay]
    fields = _all_fields()
    for name, service in FINSIGHT.items():
        w = next(w for w in r.workloads() if app_name(w) == name)
        env = pod_environment(r, overlay, w, tmp_path / name)
        for key in env:
            secret_file = key.endswith("_FILE") and key.removesuffix("_FILE") in fields
            assert (
                key in NOT_SETTINGS
                or key in fields
                or (secret_file and _is_secret(fields[key.removesuffix("_FILE")]))
            ), f"{name}: {key} is neither a setting nor the _FILE of a secret one"
        model = MODELS[service]
        secret_files = [k for k in env if k.endswith("_FILE") and k != "FINSIGHT_API_KEYS_FILE"]
        if overlay == "prod" and secret_files:
            # The example Secrets are placeholders: prod must refuse to start.
            with pytest.raises(ConfigError, match="placeholder value"):
                _load(model, env, monkeypatch)
            real = {
                n: {k: real_value(n, k, v) for k, v in kv.items()}
                for n, kv in secrets_by_name(r, overlay).items()
            }
            real["finsight-api-keys"] = secrets_by_name(r, overlay)["finsight-api-keys"]
            env = pod_environment(r, overlay, w, tmp_path / f"{name}-real", real)
        settings = _load(model, env, monkeypatch)
        assert settings.finsight_env == overlay
        assert settings.finsight_api_keys_file is not None
        assert settings.finsight_api_keys_file.exists()
        if service == "analytics":
            assert settings.finsight_service_api_key is not None
        if service == "llm_gateway":
            assert getattr(settings, "deepseek_api_key", None) is not None
        # The store follows the overlay's mode: a postgresql:// DSN, or the DuckDB file.
        if name in STORES and overlay in POSTGRES_OVERLAYS:
            assert settings.database_url is not None
            assert settings.database_url.startswith("postgresql://")
        else:
            assert settings.database_url is None, f"{overlay}/{name} must stay on DuckDB"


@pytest.mark.parametrize("overlay", DUCKDB_OVERLAYS)
def test_backup_jobs_read_only_their_key_from_a_mounted_secret(
    overlays: dict[str, Rendered], overlay: str, tmp_path: Path
) -> None:
    """The backup client reads FINSIGHT_API_KEY(_FILE) and nothing else: no ConfigMap,
    and the key is a file in a mounted Secret (never a plain env value)."""
    r = overlays[overlay]
    for job in BACKUP_JOBS:
        cron = r.get("CronJob", job)
        (c,) = pod_spec(cron)["containers"]
        assert "envFrom" not in c, f"{job}: the client reads no settings"
        assert {e["name"] for e in c["env"]} == {"FINSIGHT_API_KEY_FILE"}
        env = pod_environment(r, overlay, cron, tmp_path / job)
        assert Path(env["FINSIGHT_API_KEY_FILE"]).read_text().strip()


def test_dev_backup_key_grants_backups_and_nothing_else(
    overlays: dict[str, Rendered], tmp_path: Path
) -> None:
    """Least privilege: the key the backup jobs present may call Backup on memory and
    analytics (`<service>.admin`) but cannot read or write their data."""
    secrets = secrets_by_name(overlays["dev"], "dev")
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(secrets["finsight-api-keys"]["keys.json"])
    identity = KeyStore(keys_file).authenticate(secrets["finsight-backup-key"]["backup-api-key"])
    for service in BACKUP_JOBS.values():
        assert identity.has_scope(f"{service}.admin")
        assert not identity.has_scope(service)
    assert not identity.has_scope("llm_gateway")
    assert not identity.has_scope("analytics.write")
