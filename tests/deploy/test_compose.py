"""deploy/compose/compose.yaml agrees with the settings and the default ports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from libs.common.config import CommonSettings
from libs.common.envdoc import settings_models

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose" / "compose.yaml"
SERVICES = {"llm-gateway": "llm_gateway", "memory": "memory", "analytics": "analytics"}


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # type: ignore[no-any-return]


def _model(service: str) -> type[CommonSettings]:
    return next(m for m in settings_models() if m.service_name == service)


def test_every_environment_key_is_a_real_setting() -> None:
    for name, service in SERVICES.items():
        fields = set(_model(service).model_fields)
        env = _compose()["services"][name]["environment"]
        unknown = {k for k in env if k.lower() not in fields}
        assert not unknown, f"{name}: not settings: {sorted(unknown)}"


def test_published_ports_are_the_default_ports() -> None:
    for name, service in SERVICES.items():
        settings = _model(service)(_env_file=None, finsight_auth_enabled=False)  # type: ignore[call-arg]
        published = {tuple(map(int, p.split(":"))) for p in _compose()["services"][name]["ports"]}
        assert published == {(settings.grpc_port,) * 2, (settings.metrics_port,) * 2}


def test_mounted_files_exist_in_the_repository() -> None:
    for service in _compose()["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).resolve().is_file(), source
