"""ConfigMap = the settings models: every key a service reads is set, every value
parses, secrets come from mounted Secrets, and prod refuses the example Secrets."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from libs.common.config import CommonSettings, ConfigError, _is_secret, load_settings
from libs.common.envdoc import render_kustomize_env, settings_models
from tests.deploy.conftest import FINSIGHT, K8S, OVERLAYS, Rendered, app_name, pod_spec

MODELS = {m.service_name: m for m in settings_models()}
# Env vars a pod may set that are not settings: Downward API helpers and the
# OpenTelemetry SDK's own variable.
NOT_SETTINGS = {"POD_NAME", "POD_NAMESPACE", "OTEL_RESOURCE_ATTRIBUTES"}
EXAMPLE_SECRETS = K8S / "examples" / "secrets.example.yaml"


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


def _secret_files(r: Rendered, overlay: str) -> dict[str, dict[str, str]]:
    """Secret name -> {key: value}: rendered ones (dev) or the committed example."""
    if overlay == "dev":
        docs = r.of_kind("Secret")
        return {
            "-".join(d["metadata"]["name"].split("-")[:-1]): {
                k: base64.b64decode(v).decode() for k, v in d["data"].items()
            }
            for d in docs
        }
    docs = [d for d in yaml.safe_load_all(EXAMPLE_SECRETS.read_text()) if d]
    return {d["metadata"]["name"]: dict(d["stringData"]) for d in docs}


def pod_environment(
    r: Rendered,
    overlay: str,
    workload: dict[str, Any],
    tmp_path: Path,
    secrets: dict[str, dict[str, str]] | None = None,
) -> dict[str, str]:
    """The environment the container would see, with Secret mounts materialised in tmp_path."""
    spec = pod_spec(workload)
    (c,) = spec["containers"]
    config = r.config()
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        assert source["configMapRef"]["name"].startswith("finsight-config-")
        env.update(config)
    for item in c.get("env", []):
        env[item["name"]] = item.get("value", "from-downward-api")
    secrets = secrets if secrets is not None else _secret_files(r, overlay)
    volumes = {v["name"]: v for v in spec["volumes"]}
    remap: dict[str, Path] = {}
    for mount in c["volumeMounts"]:
        volume = volumes.get(mount["name"], {})
        if "secret" in volume:
            name = volume["secret"]["secretName"]
            base = "-".join(name.split("-")[:-1]) if overlay == "dev" else name
            assert base in secrets, f"{overlay}: Secret {name} has no example"
            target = tmp_path / mount["name"]
            target.mkdir(parents=True, exist_ok=True)
            for key, value in secrets[base].items():
                (target / key).write_text(value)
            remap[mount["mountPath"]] = target
    for key, value in list(env.items()):
        if key.endswith("_FILE") or key == "FINSIGHT_API_KEYS_FILE":
            directory, _, filename = value.rpartition("/")
            assert directory in remap, f"{key}={value} is not inside a mounted Secret"
            assert (remap[directory] / filename).exists(), (
                f"{key}: the Secret has no key {filename}"
            )
            env[key] = str(remap[directory] / filename)
    return env


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
                n: {k: f"fsk_{n}_{k}_9f2c4e7a1b" for k in kv}
                for n, kv in _secret_files(r, overlay).items()
            }
            real["finsight-api-keys"] = _secret_files(r, overlay)["finsight-api-keys"]
            env = pod_environment(r, overlay, w, tmp_path / f"{name}-real", real)
        settings = _load(model, env, monkeypatch)
        assert settings.finsight_env == overlay
        assert settings.finsight_api_keys_file is not None
        assert settings.finsight_api_keys_file.exists()
        if service == "analytics":
            assert settings.finsight_service_api_key is not None
        if service == "llm_gateway":
            assert getattr(settings, "deepseek_api_key", None) is not None
